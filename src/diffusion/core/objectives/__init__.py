"""One module per objective: DDPM (ddpm.py, with its losses in ddpm_losses.py), EDM (edm.py), flow matching
(flow.py); base.py says what every objective provides. conf/objective/<name>.yaml chooses one by its class."""
