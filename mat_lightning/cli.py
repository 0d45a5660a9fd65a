"""The ``mat`` command: a LightningCLI (``fit | validate | test | robust-eval``) plus ``data check`` and ``augment``.

:mod:`mat_lightning.main` is the front door (the command list, short help, ``mat report``, ``mat eval``): it
imports no training stack and hands the rest to :func:`main` here.

* ``mat fit --config experiments/smoke.yaml [--model.lr=1e-4 ...]``: train, then test the final weights with the
  robust evaluation callback (``robust_eval:`` in the config).
* ``mat robust-eval --config <experiment.yaml> [--ckpt_path <file>] [--export DIR]``: the robust evaluation alone,
  on any checkpoint (or on the configured encoder's starting weights without ``--ckpt_path``), optionally writing the
  adversarial test set to ``DIR``. It is ``mat test`` under a name that says what it is for.
* ``mat data check --data.dataset=flickr30k --data.root=<dir>``: read every split, decode every image, report.
* ``mat report <run dirs or results.json...>``: a paper-style table across runs.

``conf/base.yaml`` is a default config file of every subcommand. Before any class is built, the synthetic world's
names in the config (``data.dataset: synthetic``, ``pretrained/mlm/thesaurus: synthetic``, ``synthetic:<kind>``
augmentation paths) become the paths of its cached assets (:func:`mat_lightning.synthetic.resolve_config`, in
:meth:`MatCLI.before_instantiate_classes`), on a copy: the saved ``config.yaml`` keeps the names. Each run gets its
own directory, ``<run_root>/<experiment>/<timestamp>/``, holding ``config.yaml``, ``checkpoints/``, ``results.*``, ``curves.png``
and the W&B files; the saved ``config.yaml`` re-runs into a new folder. A command that evaluated prints one results
table last (wrapped to the terminal width, full metric names), then only the run folder; Lightning's metric table,
W&B's summary and known third-party warnings are off. User errors (:class:`~mat_lightning.errors.MatError`, also when
jsonargparse or Lightning wrapped it, and Lightning's ``MisconfigurationException``) print one ``error:`` line and
exit with status 2; SIGINT exits 130 and SIGTERM 143, after ``fit`` saved ``checkpoints/interrupted.ckpt``
(:mod:`mat_lightning.faults`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from mat_lightning.data.datamodule import RetrievalDataModule
from mat_lightning.errors import (
    ConfigError,
    MatError,
    NonFiniteError,
    non_finite_tensors,
    non_finite_weights_message,
)
from mat_lightning.eval.robust import RobustRetrievalEval
from mat_lightning.faults import (
    EXIT_SIGINT,
    EXIT_SIGTERM,
    Interruption,
    ResumableFit,
    install_sigterm_handler,
    interruption_message,
    resolve_last_checkpoint,
)
from mat_lightning.logging import SaveConfigToWandb, ensure_wandb_dirs
from mat_lightning.models.encoder import LOCAL_MODELS
from mat_lightning.module import NOT_A_MAT_CHECKPOINT, MatModule
from mat_lightning.options import CLI_OPTIONS
from mat_lightning.progress import StageProgressBar, quiet_bars
from mat_lightning.synthetic import name_architectures, resolve_config

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO_ROOT / "conf" / "base.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")


#: Packages whose modules a config's ``class_path`` (or any import path in a value) may name. Importing a module runs
#: its code before jsonargparse can check the type, so a config file could otherwise run any installed module's
#: import-time code (``this.Foo`` printed the Zen of Python). Users add their own with ``MAT_TRUSTED_MODULES``.
TRUSTED_MODULES = (
    "mat_lightning",
    "lightning",
    "torch",
    "torchvision",
    "open_clip",
    "transformers",
    "torchattacks",
    "textattack",
)
TRUSTED_ENV = "MAT_TRUSTED_MODULES"
_trusted_extra: set[str] = set()  # what the environment added last time (withdrawn when it changes)
_withdrawn: set[str] = set()  # denied again by name after the environment stopped naming them


def restrict_imports() -> None:
    """Only ``TRUSTED_MODULES`` and ``$MAT_TRUSTED_MODULES`` (comma-separated dot paths) are importable from values.

    jsonargparse checks the path before importing it (its ``import_path_denylist``/``allowlist`` settings; they are
    process-wide, so this is re-applied on every call and an entry the environment no longer names is denied again).
    """
    from jsonargparse import set_parsing_settings

    raw = os.environ.get(TRUSTED_ENV, "")
    extra = {m.strip() for m in raw.split(",") if m.strip()}
    bad = sorted(
        m for m in extra if not all(part.isidentifier() for part in m.split(".")) or m == "jsonargparse"
    )
    if bad:
        raise ConfigError(
            f"{TRUSTED_ENV}={raw!r}: {bad[0]!r} is not a module path; give comma-separated dot paths such as "
            "mylab,mylab.attacks"
        )
    withdrawn = sorted(_trusted_extra - extra)
    set_parsing_settings(
        import_path_denylist=["*", *withdrawn], import_path_allowlist=[*TRUSTED_MODULES, *sorted(extra)]
    )
    _trusted_extra.clear()
    _trusted_extra.update(extra)
    _withdrawn.difference_update(extra)
    _withdrawn.update(withdrawn)


def _untrusted_import(message: str) -> str | None:
    """jsonargparse's many-line union error for a denied import path, as one line saying how to allow it."""
    found = re.search(r"Importing '([\w.]+)' is not allowed", message)
    if found is None:
        return None
    path = found.group(1)
    key = re.search(r'Parser key "([^"]+)"', message)
    where = f"--{key.group(1)}: " if key else ""
    entry = re.search(r"denied by the '([^']+)' entry", message)
    if entry is not None and entry.group(1) not in (
        "*",
        *_withdrawn,
    ):  # jsonargparse's own list: modules that run commands or code
        return f"{where}{path!r} is never importable from a config: {entry.group(1)} can run commands or code"
    return (
        f"{where}{path!r} is not in a trusted package ({', '.join(TRUSTED_MODULES)}): a config may name only "
        f"these, since importing a module runs its code. If you trust it: export {TRUSTED_ENV}="
        f"{path.split('.')[0]}"
    )


class MatArgumentParser(LightningArgumentParser):
    """A parse error is one line (plus where to find the options), not 80 lines of usage above it."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        message = _untrusted_import(message) or message
        print(f"error: {message.strip()}\n(options: {prog} --help)", file=sys.stderr)
        sys.exit(2)


class MatCLI(LightningCLI):
    def __init__(self, args: list[str] | None = None, run: bool = True, alias: str | None = None) -> None:
        restrict_imports()  # before any value is parsed: a class_path names a trusted module or nothing is imported
        self.alias = alias  # the subcommand the user typed (robust-eval and eval run as test)
        self.run_dir: str | None = None  # set once the config is parsed
        self.started = time.time()
        # allow_abbrev=False: --trainer.max_epoch=3 is an error, not max_epochs by prefix matching
        sub_kwargs = {"parser_mode": "omegaconf", "allow_abbrev": False}
        if BASE_CONFIG.is_file():
            sub_kwargs["default_config_files"] = [str(BASE_CONFIG)]
        super().__init__(
            MatModule,
            RetrievalDataModule,
            save_config_callback=SaveConfigToWandb,
            save_config_kwargs={"overwrite": True},
            # Attacks need autograd at validate/test time (Lightning issues #14497, #17653): not only a YAML default.
            trainer_defaults={"inference_mode": False},
            parser_kwargs={
                "prog": "mat",
                "parser_mode": "omegaconf",
                "allow_abbrev": False,
                **{s: dict(sub_kwargs) for s in SUBCOMMANDS},
            },
            parser_class=MatArgumentParser,
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )

    def parse_arguments(self, parser, args) -> None:
        """LightningCLI's, then the defaults that follow the world written into the config: every attack a defense
        or multimodal attack leaves unset becomes its class's default, spelled out (:func:`default_part_args`),
        with the data's masked LM. So ``--print_config`` and the saved ``config.yaml`` show what runs, and
        ``--model.defense=MAT`` on synthetic data attacks with the world's MLM, not bert-base-uncased."""
        if args is not None and not isinstance(args, list | tuple):
            return super().parse_arguments(parser, args)
        argv = list(sys.argv[1:] if args is None else args)
        printing = [a for a in argv if a.split("=", 1)[0] == "--print_config"]
        rest = [a for a in argv if a not in printing]
        config = parser.parse_args(rest)
        extra = default_part_args(config)
        self.config = parser.parse_args(rest + extra + printing) if extra or printing else config

    def add_arguments_to_parser(self, parser) -> None:
        # help texts in options.py, which the front door reads without importing this module
        parser.add_argument("--experiment", type=str, default="default", help=CLI_OPTIONS["experiment"])
        parser.add_argument("--run_root", type=str, default="runs", help=CLI_OPTIONS["run_root"])
        parser.add_argument(
            "--test_ckpt", type=Literal["last", "best"], default="last", help=CLI_OPTIONS["test_ckpt"]
        )
        parser.add_argument(
            "--local_models", type=dict[str, str], default={}, help=CLI_OPTIONS["local_models"]
        )
        parser.add_lightning_class_args(RobustRetrievalEval, "robust_eval")
        parser.link_arguments("experiment", "robust_eval.experiment")

    # -- one folder per run -------------------------------------------------------------------------------------------

    def _parse_ckpt_path(self) -> None:
        """Check the run name and the checkpoint first: LightningCLI reads the checkpoint's hyperparameters here,
        with a bare ``torch.load`` (a traceback for a bad file) and before any of the hooks below."""
        if self.config.get("subcommand"):
            cfg = self.config[self.config.subcommand]
            validate_experiment_name(cfg.experiment)
            if cfg.get("ckpt_path") == "last":
                cfg.ckpt_path = resolve_last_checkpoint(cfg.run_root, cfg.experiment)
                rank_zero_info(f"--ckpt_path=last: {cfg.ckpt_path}")
            if cfg.get("ckpt_path") == "best" and self.config.subcommand != "fit":
                raise ConfigError(
                    f"--ckpt_path=best means the best checkpoint of a fit in the same command; `mat "
                    f"{self.alias or self.config.subcommand}` has none: give the checkpoint file "
                    "(<run>/checkpoints/epoch*.ckpt) or --ckpt_path=last (the latest run of --experiment)"
                )
            if cfg.get("ckpt_path") not in (None, "best", "hpc", "registry"):
                check_checkpoint(cfg.ckpt_path)
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand]
        allow_tf32()
        if cfg.trainer.default_root_dir:
            check_not_a_run_folder(cfg.trainer.default_root_dir)
        run_dir = cfg.trainer.default_root_dir or agreed_run_dir(Path(cfg.run_root) / cfg.experiment)
        cfg.trainer.default_root_dir = self.run_dir = run_dir
        _quiet_lightning(cfg)
        seed = cfg.seed_everything
        cfg.robust_eval.seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else None
        stage_wandb_in(run_dir)
        loggers = cfg.trainer.logger if isinstance(cfg.trainer.logger, list) else [cfg.trainer.logger]
        for lg in loggers:
            if not hasattr(lg, "class_path"):
                continue
            args = lg.init_args
            args.save_dir = run_dir
            if lg.class_path.endswith("WandbLogger"):
                ensure_wandb_dirs(run_dir)
                args.group = args.get("group") or cfg.experiment
                args.job_type = args.get("job_type") or self.subcommand
                args.name = args.get("name") or f"{cfg.experiment}/{Path(run_dir).name}"
            elif "name" in args:
                args.name, args.version = "", ""
        for cb in cfg.trainer.callbacks or []:
            if (
                getattr(cb, "class_path", "").endswith("ModelCheckpoint")
                and cb.init_args.get("dirpath") is None
            ):
                cb.init_args.dirpath = str(Path(run_dir) / "checkpoints")
        if self.alias != "prepare-attacks":  # it runs nothing in it, and removes it
            rank_zero_info(f"run folder: {run_dir}")
        # Synthetic-world names -> asset paths, in a copy: the classes are built from it, while the saved
        # config.yaml keeps the names (it re-runs elsewhere, building the assets there) and names the world
        # CLIP's architecture (a preset sizes its CLIP).
        name_architectures(self.config[self.subcommand])
        self.resolved_config = self.config.clone()
        resolved = resolve_config(self.resolved_config[self.subcommand])
        LOCAL_MODELS.clear()  # before the encoder and the attacks are built
        LOCAL_MODELS.update(resolved.get("local_models") or {})

    def instantiate_classes(self) -> None:
        """LightningCLI's, from the resolved copy of the config (:meth:`before_instantiate_classes`)."""
        # jsonargparse 4.49 renamed instantiate_classes (now deprecated) to instantiate
        instantiate = getattr(self.parser, "instantiate", None) or self.parser.instantiate_classes
        self.config_init = instantiate(self.resolved_config)
        self.datamodule = self._get(self.config_init, "data")
        self.model = self._get(self.config_init, "model")
        self._add_configure_optimizers_method_to_model(self.subcommand)
        self.trainer = self.instantiate_trainer()

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(ResumableFit())
        trainer.callbacks[:] = _with_stage_bars(trainer.callbacks)
        return trainer

    # -- before Lightning loads a checkpoint, and what results.json says was tested -----------------------------------

    def _before_run(self) -> None:
        cfg = self.config[self.subcommand]
        ckpt = cfg.get("ckpt_path")
        if ckpt not in (None, "best", "hpc", "registry"):
            check_checkpoint_fits(self.model, ckpt)
        else:  # the configured starting weights (a pretrained file) are what runs
            check_finite_weights(self.model.encoder.state_dict().items(), _starting_weights(cfg))
        evaluator = next((c for c in self.trainer.callbacks if isinstance(c, RobustRetrievalEval)), None)
        if evaluator is not None:
            evaluator.subcommand = self.alias or self.subcommand
            # the config as given (synthetic-world names, not cache paths): results.json's settings and hash
            evaluator.run_config = cfg.as_dict()
            if self.subcommand == "fit":
                evaluator.resumed_from = ckpt
            elif ckpt is not None:
                evaluator.weights = ckpt

    def _run_subcommand(self, subcommand: str) -> None:
        if self.alias == "prepare-attacks":
            self.prepare_attacks()
            return
        super()._run_subcommand(subcommand)

    def prepare_attacks(self) -> None:
        """``mat prepare-attacks``: the candidate stores the run of this config would build (the training text
        attack's of the train captions, each evaluation text attack's of the test captions), then a table of them on
        stdout. Trains nothing; leaves no run folder."""
        from mat_lightning.attacks.store import attach_stores, bert_attacks, store_size_bytes
        from mat_lightning.eval.robust import caption_preprocessor

        model, dm = self.model, self.datamodule
        if dm.image_size is None:
            dm.image_size = int(model.encoder.image_size)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        built: dict[str, tuple[str, str, object]] = {}
        train_attacks = [a for a in bert_attacks(model.defense) if a.max_words > 0]
        if train_attacks and model.candidate_store:
            for store in attach_stores(train_attacks, dm.train_captions(), model.encoder, device):
                built.setdefault(store.key, ("train", type(model.defense).__name__, store))
        evaluator = next((c for c in self.trainer.callbacks if isinstance(c, RobustRetrievalEval)), None)
        if evaluator is not None and evaluator.candidate_store:
            clean = caption_preprocessor(evaluator.caption_preprocess)
            captions = dm.eval_set("test").captions
            captions = [clean(c) for c in captions] if clean is not None else captions
            for attack in evaluator.attacks:
                text_attacks = [a for a in bert_attacks(attack) if a.max_words > 0]
                for store in attach_stores(text_attacks, captions, model.encoder, device):
                    built.setdefault(store.key, ("test", attack.name, store))
        remove_failed_run_dirs()  # nothing was run: no run folder
        self.run_dir = None
        if not built:
            print("no text attack with a masked LM in this config: nothing to prepare")
            return
        print(f"{'split':<5} {'for':<22} {'captions':>8} {'subst.':>9} {'MB':>6}  store")
        for key, (split, user, store) in built.items():
            m = store.meta
            print(
                f"{split:<5} {user[:22]:<22} {m['n_captions']:>8} {m['n_candidates']:>9} "
                f"{store_size_bytes(store) / 1e6:>6.1f}  {key}"
            )
        print(f"stores in {next(iter(built.values()))[2].folder.parent}", file=sys.stderr)

    def before_fit(self) -> None:
        self._before_run()

    def before_validate(self) -> None:
        self._before_run()

    def before_test(self) -> None:
        self._before_run()

    def after_fit(self) -> None:
        """Test (with the robust evaluation) the final weights, or the best checkpoint with --test_ckpt=best.

        The final model is what the robustness papers evaluate: selecting by clean validation recall would favour
        the least adversarially trained checkpoint of every defense that trades clean recall for robustness.
        """
        cfg = self.config[self.subcommand]
        ckpt_path = None  # the weights as training left them
        weights = "final"
        if cfg.test_ckpt == "best":
            callback = self.trainer.checkpoint_callback
            ckpt_path = getattr(callback, "best_model_path", "") or None
            if ckpt_path is None:
                rank_zero_warn(
                    "--test_ckpt=best but no best checkpoint was recorded: testing the final weights"
                )
            else:
                weights = "best"
        evaluator = next((c for c in self.trainer.callbacks if isinstance(c, RobustRetrievalEval)), None)
        if evaluator is not None:
            evaluator.weights = weights
        # verbose=False: the command prints one results table at its end instead of one line per logged scalar
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path, verbose=False)


def default_part_args(config) -> list[str]:
    """Options that spell out the unset attacks of the configured defense and evaluation attacks.

    A defense's or multimodal attack's attack argument left at None gets its class's default (``default_parts`` of
    :class:`~mat_lightning.defenses.base.Defense` and the multimodal attacks), with ``mlm: synthetic`` on synthetic
    data (the world's masked LM) and ``bert-base-uncased`` otherwise. Returns ``--model.defense=<json>`` and
    ``--robust_eval.attacks=<json>`` when something was filled in, else nothing.
    """
    cfg = config[config.subcommand] if config.get("subcommand") else config
    data = cfg.get("data")
    mlm = "synthetic" if data is not None and data.get("dataset") == "synthetic" else "bert-base-uncased"
    out = []
    defense = cfg.get("model") and cfg.model.get("defense")
    if defense is not None and hasattr(defense, "class_path"):
        spec = defense.as_dict()
        if _fill_parts(spec, mlm):
            out.append(f"--model.defense={json.dumps(spec, default=str)}")
    attacks = cfg.get("robust_eval") and cfg.robust_eval.get("attacks")
    if attacks:
        specs = [a.as_dict() if hasattr(a, "as_dict") else a for a in attacks]
        if sum(_fill_parts(spec, mlm) for spec in specs if isinstance(spec, dict)):
            out.append(f"--robust_eval.attacks={json.dumps(specs, default=str)}")
    return out


def _fill_parts(spec: dict, mlm: str) -> bool:
    """Fill ``spec``'s unset attack arguments with its class's ``default_parts`` (in place); whether any was."""
    import importlib
    import inspect

    module, _, name = str(spec.get("class_path", "")).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False  # jsonargparse has already said what is wrong with it
    parts = getattr(cls, "default_parts", None) or {}
    args = spec.setdefault("init_args", {})
    filled = False
    for key, (part, kwargs) in parts.items():
        if args.get(key) is not None:
            continue
        kwargs = dict(kwargs)
        if "mlm" in inspect.signature(part).parameters:
            kwargs["mlm"] = mlm
        public = importlib.import_module("mat_lightning.attacks")
        path = f"{public.__name__}.{part.__name__}" if getattr(public, part.__name__, None) is part else None
        args[key] = {"class_path": path or f"{part.__module__}.{part.__name__}", "init_args": kwargs}
        filled = True
    return filled


def _with_stage_bars(callbacks: list) -> list:
    """Lightning's progress bar (rich when installed, else tqdm: the default one or one a config names) replaced by
    :class:`~mat_lightning.progress.StageProgressBar`, moved first.

    Why replaced: rich's live display captures stderr while it runs, so the robust evaluation's tqdm bars and log
    lines interleaved with it (an epoch's bar drawn twice, a ``0%`` line and a ``100%`` line per attack), it wrote
    its bars to stdout, and in a log file its redraws became ``\r``-joined lines. Why first: its test bar closes in
    ``on_test_epoch_end``, which must run before the robust evaluation's (the attacks run in that hook).
    """
    bars = [cb for cb in callbacks if type(cb) in (RichProgressBar, TQDMProgressBar, StageProgressBar)]
    if not bars:  # trainer.enable_progress_bar=false, or a custom bar of the user's
        return callbacks
    ours = next((cb for cb in bars if isinstance(cb, StageProgressBar)), None) or StageProgressBar()
    return [ours, *(cb for cb in callbacks if not any(cb is b for b in bars))]


def allow_tf32() -> None:
    """On a CUDA GPU, fp32 matmuls and convolutions use TF32 tensor cores (``float32_matmul_precision="high"``):
    ~8x the throughput of true fp32 on Ampere and later, at a 10-bit mantissa in the products. Off the GPU the
    setting changes nothing, so it is left alone."""
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True


def stage_wandb_in(run_dir: str) -> None:
    """W&B's data and cache folders inside the run folder: the files it stages for artifacts (``results.json``,
    ``config.yaml``, ``curves.pdf``, the tables' adversarial images) land in ``<run>/wandb/artifacts/staging``, not
    in ``~/.local/share/wandb``, and its service's logs in ``<run>/wandb/cache/logs``, not ``~/.cache/wandb``: the
    run folder holds everything an offline ``wandb sync`` uploads. W&B reads both variables whenever it stages a
    file or starts its service; a later run in the same process sets its own."""
    wandb_dir = Path(run_dir).resolve() / "wandb"
    os.environ["WANDB_DATA_DIR"] = str(wandb_dir)
    os.environ["WANDB_CACHE_DIR"] = str(wandb_dir / "cache")


def _quiet_lightning(cfg) -> None:
    """Lightning's "Test metric" table off (float32 noise, 50+ rows): the run prints its own results table."""
    if "verbose" in cfg:
        cfg.verbose = False


def validate_experiment_name(name: object) -> None:
    """An experiment names the folder ``<run_root>/<experiment>/``: no path separators, no ``..``, no leading dot."""
    if not isinstance(name, str) or not re.fullmatch(r"\w[\w.-]*", name) or ".." in name:
        raise ConfigError(
            f"--experiment={name!r} is not a run name: use letters, digits, '_', '-' and '.' (not first, no '..'); "
            "it names the folder <run_root>/<experiment>/ and must stay inside it"
        )


def load_user_checkpoint(path: str) -> dict:
    """``torch.load`` a user's --ckpt_path safely (``weights_only``: no code runs), as a dict with a state dict."""
    if not Path(path).is_file():
        raise ConfigError(f"--ckpt_path {path}: no such file")
    if Path(path).stat().st_size == 0:
        raise ConfigError(f"--ckpt_path {path} is an empty file (an interrupted copy?)")
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the same user error
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(
            f"--ckpt_path {path} cannot be read as a torch checkpoint ({reason}); is it truncated or not a "
            "checkpoint? Lightning checkpoints are read with weights_only=True"
        ) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        kind = type(ckpt).__name__ if not isinstance(ckpt, dict) else "dict without 'state_dict'"
        raise ConfigError(f"--ckpt_path {path} holds a {kind}: it {NOT_A_MAT_CHECKPOINT}")
    for key, value in ckpt["state_dict"].items():
        if not isinstance(value, torch.Tensor):
            raise ConfigError(
                f"--ckpt_path {path}: state_dict[{key!r}] is a {type(value).__name__}, not a tensor; the file is "
                "damaged or not a checkpoint of this package"
            )
    return ckpt


def check_checkpoint(path: str) -> None:
    """Fail early, with a message, on a --ckpt_path that is missing or not a Lightning checkpoint."""
    load_user_checkpoint(path)


def check_finite_weights(named_tensors, what: str) -> None:
    """Refuse NaN/inf weights before any evaluation or training step: they would score as anything but an error."""
    named = list(named_tensors)
    bad = non_finite_tensors(named)
    if bad:
        total = sum(
            1 for _, t in named if callable(getattr(t, "is_floating_point", None)) and t.is_floating_point()
        )
        raise NonFiniteError(
            f"{non_finite_weights_message(what, bad, total)}. Use a checkpoint from before the run diverged"
        )


def _starting_weights(cfg) -> str:
    """How to name the configured encoder's weights in a message: its ``pretrained`` setting."""
    pretrained = (
        (cfg.model.encoder.get("init_args") or {}).get("pretrained") if "encoder" in cfg.model else None
    )
    return f"the starting weights (--model.encoder.init_args.pretrained={pretrained})"


def check_checkpoint_fits(model, path: str) -> None:
    """The checkpoint's encoder weights have the configured encoder's names and shapes (before Lightning loads it),
    all finite."""
    ckpt = load_user_checkpoint(path)
    theirs = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("encoder.")}
    ours = {k: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    missing = [k for k in ours if k not in theirs]
    unexpected = [k for k in theirs if k not in ours]
    shapes = [
        f"{k}: checkpoint {list(theirs[k].shape)} vs model {list(v.shape)}"
        for k, v in ours.items()
        if k in theirs and hasattr(theirs[k], "shape") and tuple(theirs[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        detail = "; ".join(
            part
            for part in (
                f"{len(missing)} missing weights (e.g. {missing[0]})" if missing else "",
                f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
                f"{len(shapes)} of another shape (e.g. {shapes[0]})" if shapes else "",
            )
            if part
        )
        raise ConfigError(
            f"--ckpt_path {path} does not fit the configured model ({detail}): it was trained with another "
            "encoder; check --model.encoder (model_name) or the --config it was trained with"
        )
    check_finite_weights(theirs.items(), f"--ckpt_path {path}")
    if "pytorch-lightning_version" not in ckpt:
        raise ConfigError(
            f"--ckpt_path {path} holds a state_dict but was not written by a Lightning Trainer (no "
            "'pytorch-lightning_version' key), so Lightning cannot restore it: give a checkpoint of mat fit "
            "(<run>/checkpoints/*.ckpt), or save yours with trainer.save_checkpoint"
        )


# made by this process: removed again if the run fails before it saves anything
_created_run_dirs: list[Path] = []


def agreed_run_dir(parent: Path) -> str:
    """The run folder, the same in every process of a distributed run.

    * Lightning's own DDP launcher re-executes the command on one node: the first process picks a new timestamped
      folder and its children inherit it through ``MAT_RUN_DIR``.
    * Processes started by a launcher (``torchrun``, ``srun``), possibly on several nodes, cannot inherit anything
      from each other: they name the folder after the launcher's id of the job, the same everywhere,
      ``parent/torchrun-<TORCHELASTIC_RUN_ID>`` or ``parent/slurm-<SLURM_JOB_ID>.<SLURM_STEP_ID>`` (a requeued job
      reuses its folder). Give ``--trainer.default_root_dir`` to choose the folder yourself.
    * One process: a new timestamped folder, ``parent/<YYYYmmdd-HHMMSS>``.
    """
    launcher_id = launcher_run_id()
    if launcher_id is not None:
        run_dir = parent / launcher_id
        run_dir.mkdir(parents=True, exist_ok=True)  # every node's processes make it (a shared file system)
    elif int(os.environ.get("LOCAL_RANK", "0")) > 0 and "MAT_RUN_DIR" in os.environ:
        return os.environ["MAT_RUN_DIR"]
    else:
        run_dir = Path(new_run_dir(parent))
    os.environ["MAT_RUN_DIR"] = str(run_dir)  # for the children Lightning's launcher starts
    return str(run_dir)


#: What marks a folder as a run's: a new run never writes into a folder holding one of these.
RUN_FILES = ("config.yaml", "results.json", "results.csv", "checkpoints")


def check_not_a_run_folder(folder: str) -> None:
    """Refuse ``--trainer.default_root_dir`` naming an existing run's folder (its results and config would be
    overwritten). Checked by the process that starts the run only: the processes Lightning's launcher starts after
    it (``LOCAL_RANK`` > 0) and those of an external launcher (a requeued job reuses its folder) skip it."""
    if launcher_run_id() is not None or int(os.environ.get("LOCAL_RANK", "0")) > 0:
        return
    found = [name for name in RUN_FILES if (Path(folder) / name).exists()]
    if found:
        raise ConfigError(
            f"--trainer.default_root_dir={folder} is an existing run folder (it holds {', '.join(found)}): a new run "
            "never writes into it. Give a new or empty folder, or leave the option out (each run gets its own "
            "<run_root>/<experiment>/<time>/)"
        )


def launcher_run_id() -> str | None:
    """A name shared by every process that an external launcher started for one multi-process run, else None."""
    env = os.environ
    if int(env.get("WORLD_SIZE", "1")) > 1 and env.get("TORCHELASTIC_RUN_ID", "none") != "none":
        return f"torchrun-{env['TORCHELASTIC_RUN_ID']}"
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env:
        step = env.get("SLURM_STEP_ID")
        return f"slurm-{env['SLURM_JOB_ID']}" + (f".{step}" if step is not None else "")
    return None


def new_run_dir(parent: Path) -> str:
    """``parent/<YYYYmmdd-HHMMSS>``, with a ``-<n>`` suffix if that folder already exists."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, n = parent / stamp, 1
    while candidate.exists():
        candidate, n = parent / f"{stamp}-{n}", n + 1
    try:
        candidate.mkdir(parents=True)
    except OSError as e:
        raise ConfigError(
            f"cannot create the run folder {candidate} ({e.strerror}); check --run_root"
        ) from None
    _created_run_dirs.append(candidate)
    return str(candidate)


def remove_failed_run_dirs() -> None:
    """Remove run folders of this process that hold no checkpoint and no results (a run that failed to start)."""
    while _created_run_dirs:
        run_dir = _created_run_dirs.pop()
        if not run_dir.is_dir():
            continue
        kept = [p for p in run_dir.rglob("*") if p.suffix == ".ckpt" or p.name.startswith("results.")]
        if not kept:
            shutil.rmtree(run_dir, ignore_errors=True)
            try:
                run_dir.parent.rmdir()  # the experiment folder, if this was its only run
            except OSError:
                pass


def _finish_wandb() -> None:
    """Close the W&B run of this command, so the next run in the same process gets its own (template #289)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def _export_alias(args: list[str]) -> list[str]:
    """``--export DIR`` (robust-eval's short form) -> ``--robust_eval.export_dir=DIR``."""
    out, i = [], 0
    while i < len(args):
        if args[i] == "--export" and i + 1 < len(args):
            out.append(f"--robust_eval.export_dir={args[i + 1]}")
            i += 2
            continue
        if args[i].startswith("--export="):
            out.append("--robust_eval.export_dir=" + args[i].split("=", 1)[1])
        else:
            out.append(args[i])
        i += 1
    return out


def _print_final(cli: MatCLI | None) -> None:
    """The last lines of a command: the run's results table (when it wrote one), then only the run folder.

    Printed after W&B has closed, on stdout (everything else goes to stderr), wrapped to the terminal width
    (80 columns on a non-TTY: nohup, SLURM, tee) without shortening a metric name.
    """
    run_dir = getattr(cli, "run_dir", None)
    if run_dir is None or int(os.environ.get("LOCAL_RANK", "0")) or int(os.environ.get("NODE_RANK", "0")):
        return
    from mat_lightning.eval.report import format_results

    sys.stderr.flush()
    results = Path(run_dir) / "results.json"
    if results.is_file() and results.stat().st_mtime >= cli.started:
        width = shutil.get_terminal_size((80, 24)).columns
        print("\n" + format_results(json.loads(results.read_text()), width=max(width, 40)))
    print(f"run folder: {run_dir}", flush=True)


class _DropTips(logging.Filter):
    """Drops Lightning's advertising tips (litlogger) from its console log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def _quiet_console() -> None:
    """No avoidable warnings or banners: the results table is the run's summary."""
    os.environ.setdefault("WANDB_SILENT", "true")  # W&B's run summary dump and sync banner
    # Lightning's own code calls torch's deprecated LeafSpec check (lightning/pytorch/utilities/_pytree.py)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
    # DDP: one warning per val/test metric. Those metrics are computed from embeddings gathered across ranks (the
    # same value on every rank), so there is nothing for sync_dist to average.
    warnings.filterwarnings(
        "ignore", message=r"It is recommended to use `self.log\('(val|test)/", category=UserWarning
    )
    # Resuming (--ckpt_path) writes into this run's own new folder by design, not the folder the checkpoint came from
    warnings.filterwarnings("ignore", message=r"The dirpath has changed from", category=UserWarning)
    tip_logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropTips) for f in tip_logger.filters):
        tip_logger.addFilter(_DropTips())
    if not getattr(warnings.showwarning, "above_bars", False):
        warnings.showwarning = _above_bars(warnings.showwarning)


def _above_bars(write):
    """``write`` (``warnings.showwarning``, a log handler's ``emit``) writing above the open progress bars of a
    terminal, not into the line of one."""

    def above_bars(*args, **kwargs):
        with quiet_bars():
            write(*args, **kwargs)

    above_bars.above_bars = True
    return above_bars


def _print_error(e: BaseException) -> None:
    msg = str(e)
    if "Original Traceback" in msg:  # from a DataLoader worker: keep the error line, not the worker's trace
        msg = msg.strip().splitlines()[-1].split(": ", 1)[-1]
    print(f"error: {msg}", file=sys.stderr)


def user_error(e: BaseException) -> BaseException | None:
    """The user-facing error inside ``e``, if any: our MatError (also when jsonargparse or Lightning wrapped it while
    instantiating a class) or Lightning's MisconfigurationException."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, MatError | MisconfigurationException):
            return e
        if type(e).__module__.startswith(
            "omegaconf"
        ):  # parser_mode omegaconf: a ${...} that does not resolve
            where = getattr(e, "full_key", None)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            return ConfigError(
                f"a ${{...}} interpolation in the config cannot be resolved{f' at {where}' if where else ''}: "
                f"{first}. Fix it in the --config file or the option that sets it"
            )
        e = e.__cause__ or e.__context__
    return None


def check_config_files(argv: list[str]) -> None:
    """Every ``--config FILE`` is a readable text file (``mat data check`` and a direct call of :func:`main` do not
    pass the front door's check)."""
    from mat_lightning.options import read_config_text

    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            read_config_text(argv[i + 1])
        elif arg.startswith("--config="):
            read_config_text(arg.split("=", 1)[1])


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (a test's capture, a redirect), not the stream of the first call,
    above the open progress bars of a terminal (not into the line of one)."""

    def emit(self, record: logging.LogRecord) -> None:
        with quiet_bars():
            super().emit(record)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging() -> None:
    """Our INFO messages (world building, results paths) on stderr; other libraries keep their own settings."""
    logger = logging.getLogger("mat_lightning")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[mat] %(message)s"))
        logger.addHandler(handler)
        # one voice per distributed run: the other ranks report warnings and errors only
        logger.setLevel(logging.INFO if rank_zero_only.rank == 0 else logging.WARNING)
        logger.propagate = False
    # Lightning's messages ("Detected KeyboardInterrupt", "`Trainer.fit` stopped") go through its own handlers
    for name in ("lightning.pytorch", "lightning.fabric"):
        for lightning_handler in logging.getLogger(name).handlers:
            if type(lightning_handler) is logging.StreamHandler and not getattr(
                lightning_handler.emit, "above_bars", False
            ):
                lightning_handler.emit = _above_bars(lightning_handler.emit)


def main(argv: list[str] | None = None) -> None:
    _setup_logging()
    _quiet_console()
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    Interruption.reset()
    previous_handler = install_sigterm_handler()
    try:
        restrict_imports()  # every subcommand's parser, data check's and augment's too
        _main(argv, from_command_line)
    except (SystemExit, KeyboardInterrupt) as e:
        if Interruption.signal is None and isinstance(e, KeyboardInterrupt):
            Interruption.signal = "SIGINT"
        if Interruption.signal is None:
            raise
        print(f"error: {interruption_message()}", file=sys.stderr)
        sys.exit(EXIT_SIGTERM if Interruption.signal == "SIGTERM" else EXIT_SIGINT)
    except Exception as e:
        found = user_error(e)
        if found is None:
            raise
        remove_failed_run_dirs()
        _print_error(found)
        sys.exit(2)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    if Interruption.signal == "SIGTERM":  # received during an evaluation that then completed
        print(f"error: {interruption_message()}", file=sys.stderr)
        sys.exit(EXIT_SIGTERM)


def _main(argv: list[str], from_command_line: bool) -> None:
    from mat_lightning.main import front_door

    alias = argv[0] if argv[:1] in (["robust-eval"], ["eval"], ["prepare-attacks"]) else None
    argv = front_door(argv)  # help, report, eval -> test
    if argv is None:
        return
    check_config_files(argv)
    if argv[:2] == ["data", "check"]:
        from mat_lightning.data.check import main as data_check

        data_check(argv[2:], resolve=resolve_config)
        return
    if argv[:1] == ["transfer"]:
        from mat_lightning.eval.transfer import run as transfer

        # each target runs as its own `mat robust-eval` (from the command line: sys.argv becomes it, so that
        # DDP's launcher re-executes that evaluation, not the whole transfer)
        folder = transfer(argv[1:], evaluate=lambda args: _main(args, from_command_line))
        print((folder / "transfer.md").read_text(), end="")
        print(f"transfer folder: {folder}", file=sys.stderr)
        return
    if argv[:1] == ["augment"]:
        from mat_lightning.data.augment.generate import main as augment

        augment(argv[1:])
        return
    if argv[:1] == ["robust-eval"]:
        argv = ["test", *_export_alias(argv[1:])]
    if argv[:1] == ["prepare-attacks"]:
        argv = ["fit", *argv[1:]]
    cli = None
    try:
        if from_command_line:
            sys.argv[1:] = argv  # DDP re-executes sys.argv in each process; keep it what we run
            cli = MatCLI(alias=alias)
        else:
            with warnings.catch_warnings():
                # Called from Python (tests, notebooks) with explicit args while sys.argv holds the caller's own
                # arguments: Lightning warns in case both were meant; here only args are.
                warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
                cli = MatCLI(args=argv, alias=alias)
    finally:
        _finish_wandb()
        LOCAL_MODELS.clear()  # this run's --local_models must not leak into the next run in the same process
    _print_final(cli)


if __name__ == "__main__":
    main()
