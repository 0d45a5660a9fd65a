"""Errors a user can fix. The ``mat`` CLI prints them as one message (no traceback) and exits non-zero.

Each message names the file, key or value at fault and says what to do.
"""


class MatError(Exception):
    """Base class of the user-facing errors."""


class ConfigError(MatError, ValueError):
    """A configuration value is wrong or names something that does not exist."""


class DataError(MatError, ValueError):
    """A data set file, folder, entry or image is missing or malformed."""


class NonFiniteError(MatError, ArithmeticError):
    """A NaN or infinite number where a result was due: a similarity, a loss or a weight (DESIGN §4).

    Never reported as a result: a NaN similarity compares false with everything, so a ranking would count it as a
    hit (a NaN model scored 100 % recall before this check).
    """


class WriteError(MatError, OSError):
    """A file could not be written (a full disk, no permission); the file was left as it was."""


def is_synthetic_name(value: object) -> bool:
    """Whether ``value`` is a synthetic-world name (``synthetic``, ``synthetic:<...>``) rather than a path or hub
    name. Only the ``mat`` CLI turns these into paths (:func:`mat_lightning.synthetic.resolve_config`)."""
    return isinstance(value, str) and (value == "synthetic" or value.startswith("synthetic:"))


def unresolved_synthetic_name(what: str, value: str, helper: str) -> ConfigError:
    """The error of a layer below the synthetic world that was handed a synthetic-world name instead of a path.

    Args:
        what: the setting, e.g. ``"BertAttack mlm"``.
        value: the name it got.
        helper: the call that gives the path from Python, e.g. ``"ensure_mlm('tiny')"``.
    """
    return ConfigError(
        f"{what}={value!r}: synthetic-world names are resolved to paths by the mat CLI; from Python, pass "
        f"mat_lightning.synthetic.{helper} (or run mat_lightning.synthetic.resolve_config on a parsed config)"
    )


def non_finite_tensors(named_tensors) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an infinite value.

    Args:
        named_tensors: ``(name, tensor)`` pairs (``module.named_parameters()``, ``state_dict().items()``); other
            values (step counters, integer buffers) are skipped.
    """
    return [
        name
        for name, t in named_tensors
        if callable(getattr(t, "is_floating_point", None))
        and t.is_floating_point()
        and not bool(t.isfinite().all())
    ]


def non_finite_weights_message(what: str, bad: list[str], total: int) -> str:
    """``<what> holds non-finite weights: n of total tensors ... (e.g. name)``: the start of a NonFiniteError."""
    return (
        f"{what} holds non-finite weights: {len(bad)} of {total} weight tensors contain NaN or inf (e.g. {bad[0]}); "
        "a diverged training run? A non-finite model has no recall to report"
    )


def check_eps_255(values: object, option: str) -> list[float]:
    """Image budgets in 1/255 units that the user gave under ``option`` (a flag such as ``--eps`` or a config key
    such as ``robust_eval.eps_255_grid``), as floats: one number or a list, each finite and > 0.

    An ε of 0 attacks nothing (its row would be clean recall labelled as an attack); inf or NaN is no budget.
    """
    items = values if isinstance(values, list | tuple) else [values]
    out = []
    for v in items:
        try:
            e = float(v)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            e = float("nan")
        if not (e > 0 and e != float("inf")):
            raise ConfigError(
                f"{option}={values}: every ε (in 1/255) must be a finite number > 0, e.g. 2 "
                f"({v} {'attacks nothing' if e == 0 else 'is not a budget'})"
            )
        out.append(e)
    return out
