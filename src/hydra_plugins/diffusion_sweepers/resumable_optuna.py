"""An Optuna sweep that survives its -m process: `hydra/sweeper=resumable_optuna` (experiment=optuna_digits).

hydra-optuna-sweeper 1.3 keeps its study in `hydra.sweeper.storage` and loads a stored one again
(load_if_exists), but then numbers its jobs from 0, so new trials land in the folders of earlier ones, and asks
`n_trials` more. Run again into the same hydra.sweep.dir (whose optuna.db holds the study), this sweeper
instead: keeps the trials that ended (their values stay in the study, TPE goes on from them), runs each trial
that was running when the process died again in its own job folder (a training job resumes from its own
last.ckpt) and tells the study its value, then asks only the trials still missing from n_trials, numbered
after the earlier ones; a seeded sampler is seeded with seed + the number of earlier trials (made afresh with
its own seed it would propose the earlier trials again). Everything else is hydra-optuna-sweeper's.
"""

from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper


class ResumableOptunaSweeper(OptunaSweeper):
    def sweep(self, arguments: list[str]) -> Any:
        impl = self.sweeper
        if impl.storage is not None:
            _continue_study(impl)
        return impl.sweep(arguments)


def _continue_study(impl) -> None:
    """Finish the stored study's cut-off trials and set the sweep to go on after its trials."""
    import optuna  # as hydra-optuna-sweeper does: not at plugin discovery, which every entry point runs
    from optuna.trial import TrialState

    if str(impl.storage).startswith("sqlite:///"):
        Path(str(impl.storage).removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        study = optuna.load_study(study_name=impl.study_name, storage=impl.storage)
    except KeyError:  # no such study yet: hydra-optuna-sweeper creates it
        return
    trials = study.get_trials(deepcopy=False)
    cut = [t for t in trials if t.state == TrialState.RUNNING]  # their -m process died while they ran
    ended = sum(t.state.is_finished() for t in trials)
    print(f"study {impl.study_name} in {impl.storage}: {ended} trial(s) ended before and are kept; "
          f"{len(cut)} cut off, run again in their folders; {max(impl.n_trials - len(trials), 0)} new", flush=True)
    for trial in cut:
        overrides = tuple(f"{k}={v}" for k, v in {**trial.params, **trial.user_attrs}.items())
        (ret,) = impl.launcher.launch([overrides], initial_job_idx=trial.number)
        try:
            study.tell(trial.number, float(ret.return_value))
        except Exception as err:  # a failed job (JobReturn re-raises its error) or a value that is not a float
            study.tell(trial.number, state=TrialState.FAIL)
            print(f"trial {trial.number} failed: {err}", flush=True)
    impl.job_idx = len(trials)
    impl.n_trials = max(impl.n_trials - len(trials), 0)
    sampler = impl.config.hydra.sweeper.sampler
    if sampler.get("seed") is not None:  # a seeded sampler made afresh would propose the earlier trials again
        impl.sampler = instantiate(sampler, seed=sampler.seed + len(trials))
