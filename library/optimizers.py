"""Optimizers and learning-rate schedules with sd-scripts' flags (`--optimizer_type`, `--optimizer_args`,
`--lr_scheduler*`, `--lr_warmup_steps`) and its `ss_optimizer` description string.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import importlib
import logging
import re
from typing import Iterable, Optional

import torch

from library.train_util import TrainingSetupError, _arg

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------------------------------------------

OPTIMIZER_CHOICES = ("AdamW", "AdamW8bit", "SGDNesterov", "Adafactor")
BNB_HINT = "a GPU extra: pip install -r requirements-gpu.txt, or use --optimizer_type AdamW"
# sd-scripts' other --optimizer_type names: (class path, how to install it, constructor arguments they imply).
# The packages are optional: a name works once its package is installed, and says how to install it otherwise.
_DADAPT = "pip install dadaptation"
_SF = "pip install schedulefree"
NAMED_OPTIMIZERS = {
    "Lion": ("lion_pytorch.Lion", "pip install lion-pytorch", {}),
    "Prodigy": ("prodigyopt.Prodigy", "pip install prodigyopt", {}),
    "DAdaptation": ("dadaptation.experimental.DAdaptAdamPreprint", _DADAPT, {}),
    "DAdaptAdamPreprint": ("dadaptation.experimental.DAdaptAdamPreprint", _DADAPT, {}),
    "DAdaptAdam": ("dadaptation.DAdaptAdam", _DADAPT, {}),
    "DAdaptAdaGrad": ("dadaptation.DAdaptAdaGrad", _DADAPT, {}),
    "DAdaptAdan": ("dadaptation.DAdaptAdan", _DADAPT, {}),
    "DAdaptAdanIP": ("dadaptation.experimental.DAdaptAdanIP", _DADAPT, {}),
    "DAdaptLion": ("dadaptation.DAdaptLion", _DADAPT, {}),
    "DAdaptSGD": ("dadaptation.DAdaptSGD", _DADAPT, {}),
    "Lion8bit": ("bitsandbytes.optim.Lion8bit", BNB_HINT, {}),
    "PagedLion8bit": ("bitsandbytes.optim.PagedLion8bit", BNB_HINT, {}),
    "PagedAdamW": ("bitsandbytes.optim.PagedAdamW", BNB_HINT, {}),
    "PagedAdamW8bit": ("bitsandbytes.optim.PagedAdamW8bit", BNB_HINT, {}),
    "PagedAdamW32bit": ("bitsandbytes.optim.PagedAdamW32bit", BNB_HINT, {}),
    "SGDNesterov8bit": ("bitsandbytes.optim.SGD8bit", BNB_HINT, {"nesterov": True}),
    "RAdamScheduleFree": ("schedulefree.RAdamScheduleFree", _SF, {}),
    "AdamWScheduleFree": ("schedulefree.AdamWScheduleFree", _SF, {}),
    "SGDScheduleFree": ("schedulefree.SGDScheduleFree", _SF, {}),
}
_NAMED_BY_KIND = {k.lower(): v for k, v in NAMED_OPTIMIZERS.items()}  # names are matched case-insensitively


def parse_kv_args(values: Optional[Iterable[str]], flag: str) -> dict:
    """Parse `k=v` strings with `ast.literal_eval` values (sd-scripts `--optimizer_args` / `--lr_scheduler_args`)."""
    kwargs = {}
    for item in values or []:
        if "=" not in item:
            raise TrainingSetupError(f"{flag}: {item!r} is not key=value (e.g. {flag} weight_decay=0.01 betas=0.9,0.999)")
        key, value = item.split("=", 1)
        key = key.strip()
        try:
            kwargs[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            word = value.strip()
            if word.lower() in ("true", "false", "none"):  # quoting would pass the string 'false', which is true
                fix = f"switches and None are capitalised: {key}={word.capitalize()}"
            else:
                fix = f"numbers, True/False, tuples (0.9,0.999) work as they are, strings need quotes: {key}='{word}'"
            raise TrainingSetupError(f"{flag}: the value of {item!r} is not a Python literal; {fix}") from None
    return kwargs


def _import_optimizer_class(path: str):
    """`torch.optim` class name (no dot) or a `module.ClassName` path, with a usable error when it is missing."""
    if "." not in path:
        cls = getattr(torch.optim, path, None)
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer):
            return cls
        torch_names = [n for n in dir(torch.optim) if isinstance(getattr(torch.optim, n), type)
                       and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)]
        known = (*OPTIMIZER_CHOICES, *NAMED_OPTIMIZERS, *torch_names)
        close = difflib.get_close_matches(path.lower(), [n.lower() for n in known], n=1)
        spelled = {n.lower(): n for n in known}
        hint = f" (did you mean {spelled[close[0]]}?)" if close else ""
        raise TrainingSetupError(
            f"--optimizer_type {path!r} is not known{hint}; choose one of {', '.join(OPTIMIZER_CHOICES)}, "
            f"sd-scripts' optional ones ({', '.join(NAMED_OPTIMIZERS)}), a torch.optim class name (e.g. RAdam), "
            "or a module path such as mypackage.MyOptimizer"
        )
    hint = BNB_HINT if path.split(".")[0] == "bitsandbytes" else f"install the package that provides {path.rsplit('.', 1)[0]}"
    return _import_class(path, path, lambda module_name, e: f"--optimizer_type {path} needs the module "
                                                            f"{module_name} ({e}): {hint}")


def _import_class(path: str, flag_value: str, missing):
    """The class at `module.ClassName`; `missing(module_name, error)` words the error when the module is not there."""
    module_name, class_name = path.rsplit(".", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise TrainingSetupError(missing(module_name, e)) from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise TrainingSetupError(f"--optimizer_type {flag_value}: the module {module_name} has no class {class_name}")
    return cls


def _named_optimizer_class(optimizer_type: str):
    """The class of one of sd-scripts' optional-package names (NAMED_OPTIMIZERS), or an error saying what to install."""
    path, hint, _ = _NAMED_BY_KIND[optimizer_type.lower()]
    return _import_class(path, optimizer_type, lambda module_name, e: (
        f"--optimizer_type {optimizer_type} uses {path}, whose package is not installed ({e}): {hint}, or choose "
        f"one of {', '.join(OPTIMIZER_CHOICES)}"))


def inner_optimizer(optimizer):
    """The torch optimizer itself, under accelerate's AcceleratedOptimizer wrapper if there is one."""
    return getattr(optimizer, "optimizer", optimizer)


def is_schedule_free(optimizer) -> bool:
    """A schedule-free optimizer (Defazio et al. 2024; sd-scripts' *ScheduleFree names): it steps one set of
    weights and evaluates another, switched by its .train()/.eval(), and schedules the learning rate itself."""
    inner = inner_optimizer(optimizer)
    return type(inner).__name__.lower().endswith("schedulefree") and callable(getattr(inner, "eval", None))


@contextlib.contextmanager
def evaluation_weights(optimizer):
    """Within: the weights a schedule-free optimizer evaluates (its .eval()), for saving, sampling and validation,
    as sd-scripts does; back to the ones it steps (.train()) after. Any other optimizer: nothing happens."""
    if not is_schedule_free(optimizer):
        yield
        return
    inner = inner_optimizer(optimizer)
    inner.eval()
    try:
        yield
    finally:
        inner.train()


def _all_on_cuda(params) -> bool:
    """Whether every tensor of `params` (tensors or param-group dicts) is on a CUDA device."""
    tensors = []
    for p in params:
        group = p["params"] if isinstance(p, dict) else [p]
        if not isinstance(group, (list, tuple)):
            return False  # a generator: do not consume it
        tensors.extend(group)
    return bool(tensors) and all(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors)


def defer_step_read(args, optimizer, device_type: str) -> bool:
    """--defer_step_read: whether a non-finite update is dropped on the device (the optimizer's `found_inf`, which
    GradScaler uses with fused optimizers, fp16 or not) and each step read back one step later, so that the host
    never waits for the device. auto: on CUDA when the optimizer can (AdamW is fused there by default); on: wherever
    it can, else an error saying why; off: one read at each step's end decides the step."""
    mode = getattr(args, "defer_step_read", "off")
    if mode == "off":
        return False
    inner = inner_optimizer(optimizer)
    why = None
    if not getattr(inner, "_step_supports_amp_scaling", False):
        why = (f"{type(inner).__name__} cannot skip an update on the device (AdamW with fused=True can: the default "
               "on CUDA unless --optimizer_args names fused or foreach)")
    if why and mode == "on":
        raise TrainingSetupError(f"--defer_step_read on: {why}; or use --defer_step_read auto/off")
    if why and device_type == "cuda":
        logger.info("--defer_step_read auto: off, %s", why)
    on = why is None and (mode == "on" or device_type == "cuda")
    if on:
        logger.info("--defer_step_read %s: on; a non-finite update is dropped on the device, and the progress bar "
                    "and logs show each step one step late", mode)
    return on


def optimizer_name(args) -> str:
    """The --optimizer_type the flags ask for, sd-scripts' legacy spellings (`--use_8bit_adam`,
    `--use_lion_optimizer`) resolved; two that disagree are an error, as in sd-scripts. "AdamW" beside a legacy flag
    is accepted: it is the parser's default, so it cannot be told apart from an unset flag."""
    optimizer_type = getattr(args, "optimizer_type", None) or ""
    legacy = [(flag, name) for flag, name in (("use_8bit_adam", "AdamW8bit"), ("use_lion_optimizer", "Lion"))
              if getattr(args, flag, False)]
    if len(legacy) == 2:
        raise TrainingSetupError("--use_8bit_adam and --use_lion_optimizer disagree: use only --optimizer_type")
    for flag, name in legacy:
        if optimizer_type.lower() not in ("", "adamw", name.lower()):
            raise TrainingSetupError(f"--{flag} and --optimizer_type {optimizer_type} disagree: use only --optimizer_type")
        optimizer_type = name
    return optimizer_type or "AdamW"


def resolve_optimizer(args) -> tuple[str, type]:
    """(the --optimizer_type name, its class): `optimizer_name`, the class imported. A package that is missing or a
    name that is not known is a TrainingSetupError saying what to install or choose; checked before the model loads
    (library/args_check), not minutes into a run."""
    optimizer_type = optimizer_name(args)
    kind = optimizer_type.lower()
    if kind == "adamw":
        return optimizer_type, torch.optim.AdamW
    if kind == "adamw8bit":
        try:
            import bitsandbytes as bnb  # noqa: F401  (optional GPU extra)
        except ImportError:
            raise TrainingSetupError(f"--optimizer_type AdamW8bit needs bitsandbytes, {BNB_HINT}") from None
        return optimizer_type, bnb.optim.AdamW8bit
    if kind == "sgdnesterov":
        return optimizer_type, torch.optim.SGD
    if kind == "adafactor":
        from transformers.optimization import Adafactor

        return optimizer_type, Adafactor
    if kind in _NAMED_BY_KIND:
        return optimizer_type, _named_optimizer_class(optimizer_type)
    return optimizer_type, _import_optimizer_class(optimizer_type)


def get_optimizer(args, trainable_params) -> tuple[str, torch.optim.Optimizer]:
    """Build the optimizer the flags ask for; returns (description, optimizer).

    The description is sd-scripts' `ss_optimizer` string: `module.Class(k=v,...)`, e.g.
    `torch.optim.adamw.AdamW(weight_decay=0.01)`. Built in: AdamW (default; fused=True when every parameter is on
    CUDA and --optimizer_args names neither fused nor foreach), AdamW8bit (bitsandbytes, optional),
    SGDNesterov (torch SGD, nesterov, momentum 0.9 unless given), Adafactor (transformers); also any torch.optim
    class name or `module.ClassName` (`resolve_optimizer`). `--use_8bit_adam` is the legacy spelling of AdamW8bit.
    As in sd-scripts, Adafactor with relative_step (its default) ignores the learning rates and switches
    `args.lr_scheduler` to `adafactor:<lr>`.
    """
    optimizer_type, optimizer_class = resolve_optimizer(args)
    kind = optimizer_type.lower()
    kwargs = parse_kv_args(getattr(args, "optimizer_args", None), "--optimizer_args")
    lr = getattr(args, "learning_rate", None)
    extra: dict = {}  # constructor arguments that are not part of the description (sd-scripts' convention)

    if not isinstance(trainable_params, (list, tuple)):
        trainable_params = list(trainable_params)

    if kind == "adamw":
        if "fused" not in kwargs and "foreach" not in kwargs and _all_on_cuda(trainable_params):
            extra["fused"] = True  # one kernel per step instead of ~12 per tensor list; torch's default is foreach
    elif kind == "sgdnesterov":
        kwargs.setdefault("momentum", 0.9)
        extra["nesterov"] = True
    elif kind == "adafactor":
        kwargs.setdefault("relative_step", True)
        if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
            logger.info("Adafactor: warmup_init=True needs relative_step=True; setting relative_step=True")
            kwargs["relative_step"] = True
        if kwargs["relative_step"]:
            # relative_step computes its own lr: the schedule becomes AdafactorSchedule, group lrs are dropped
            if lr:
                logger.warning("Adafactor with relative_step: --learning_rate is used only as the initial lr")
            if trainable_params and isinstance(trainable_params[0], dict):
                had_group_lr = False
                for group in trainable_params:
                    had_group_lr = (group.pop("lr", None) is not None) or had_group_lr
                if had_group_lr:
                    logger.warning("Adafactor with relative_step ignores --unet_lr and --text_encoder_lr")
                    args.unet_lr = args.text_encoder_lr = None  # as sd-scripts: the metadata says they were unused
            if not str(getattr(args, "lr_scheduler", "") or "").startswith("adafactor"):
                logger.info("Adafactor with relative_step sets its own learning rate: --lr_scheduler %s is replaced "
                            "by adafactor:%s, as in sd-scripts (--optimizer_args relative_step=False "
                            "scale_parameter=False warmup_init=False keeps your schedule and --learning_rate)",
                            getattr(args, "lr_scheduler", None), lr)
            args.lr_scheduler = f"adafactor:{lr}"
            args.learning_rate = lr = None
    elif kind in _NAMED_BY_KIND:
        implied = _NAMED_BY_KIND[kind][2]
        if kind == "sgdnesterov8bit":
            kwargs.setdefault("momentum", 0.9)
        extra.update({k: v for k, v in implied.items() if k not in kwargs})
        if kind.startswith("dadapt") or kind == "prodigy":  # sd-scripts' advice for learning-rate-free methods
            group_lrs = [g.get("lr", lr) for g in trainable_params if isinstance(g, dict)] or [lr]
            first = group_lrs[0]  # the rate that drives the estimate, as sd-scripts checks it
            if first is not None and first <= 0.1:
                logger.warning(f"--optimizer_type {optimizer_type} estimates the step size itself and expects a "
                               f"learning rate around 1.0 (got {first})")
            distinct = sorted({r for r in group_lrs if r is not None})
            if len(distinct) > 1:
                logger.warning(f"--optimizer_type {optimizer_type}: several learning rates ({distinct}) share one "
                               "step-size estimate; the first group's drives it (sd-scripts warns alike)")

    if lr is not None or kind == "adafactor":
        extra["lr"] = lr  # without --learning_rate the optimizer's own default applies
    try:
        optimizer = optimizer_class(trainable_params, **kwargs, **extra)
    except TypeError as e:
        raise TrainingSetupError(
            f"--optimizer_type {optimizer_type} rejected --optimizer_args {kwargs}: {e}; check the argument names"
        ) from None
    except (ValueError, IndexError, KeyError, AssertionError) as e:
        raise TrainingSetupError(
            f"--optimizer_type {optimizer_type} rejected its settings ({type(e).__name__}: {e}); "
            f"check --learning_rate ({lr}) and --optimizer_args {kwargs}"
        ) from None

    name = optimizer_class.__module__ + "." + optimizer_class.__name__
    args_str = ",".join(f"{k}={v}" for k, v in kwargs.items())
    return name + (f"({args_str})" if args_str else ""), optimizer


# ---------------------------------------------------------------------------------------------------------------
# Learning-rate schedules
# ---------------------------------------------------------------------------------------------------------------

TRANSFORMERS_SCHEDULERS = ("cosine_with_min_lr", "warmup_stable_decay", "inverse_sqrt")
SCHEDULER_CHOICES = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "piecewise_constant",
    *TRANSFORMERS_SCHEDULERS,
    "adafactor",
)


def _transformers_schedule(name, args, optimizer, warmup: int, total: int, num_processes: int, kwargs: dict):
    """sd-scripts' schedules from transformers: cosine_with_min_lr (`--lr_scheduler_min_lr_ratio`),
    warmup_stable_decay (`--lr_decay_steps`, the rest after warmup stable), inverse_sqrt
    (`--lr_scheduler_timescale`). `--lr_scheduler_num_cycles` counts half-cosines, as sd-scripts passes it."""
    from transformers import optimization as tro

    cycles = float(_arg(args, "lr_scheduler_num_cycles", 1)) / 2
    min_ratio = getattr(args, "lr_scheduler_min_lr_ratio", None)
    if name == "inverse_sqrt":
        timescale = getattr(args, "lr_scheduler_timescale", None)
        timescale = None if timescale is None else int(timescale) * num_processes
        return tro.get_inverse_sqrt_schedule(optimizer, num_warmup_steps=warmup, timescale=timescale, **kwargs)
    if name == "cosine_with_min_lr":
        if min_ratio is None and ("min_lr" in kwargs or "min_lr_rate" in kwargs):  # sd-scripts passes them on
            return tro.get_cosine_with_min_lr_schedule_with_warmup(optimizer, num_warmup_steps=warmup,
                                                                   num_training_steps=total, num_cycles=cycles,
                                                                   **kwargs)
        if min_ratio is None:
            raise TrainingSetupError("--lr_scheduler cosine_with_min_lr needs --lr_scheduler_min_lr_ratio (the floor "
                                     "as a fraction of the learning rate, e.g. 0.1)")
        return tro.get_cosine_with_min_lr_schedule_with_warmup(optimizer, num_warmup_steps=warmup,
                                                               num_training_steps=total, num_cycles=cycles,
                                                               min_lr_rate=min_ratio, **kwargs)
    decay = _schedule_steps(getattr(args, "lr_decay_steps", None), total, num_processes, "--lr_decay_steps")
    if warmup + decay > total:  # no --lr_decay_steps: 0, the rate stays up to the end (sd-scripts' default)
        raise TrainingSetupError(f"--lr_scheduler warmup_stable_decay: the warmup and --lr_decay_steps must fit in "
                                 f"the {total // num_processes} steps (got warmup {warmup // num_processes}, decay "
                                 f"{decay // num_processes})")
    return tro.get_wsd_schedule(optimizer, num_warmup_steps=warmup, num_stable_steps=total - warmup - decay,
                                num_decay_steps=decay, num_cycles=cycles, min_lr_ratio=min_ratio or 0.0, **kwargs)


def int_or_float(value: str):
    """argparse type of `--lr_warmup_steps` (sd-scripts): "N%" → N/100, "0.1" or "1.0" → a ratio (1.0: the whole
    run, as a TOML 1.0), "100" → 100 steps."""
    text = str(value).strip()
    try:
        if text.endswith("%"):
            ratio = float(text[:-1]) / 100.0
            if not 0 <= ratio <= 1:  # 200% would read as 2.0, i.e. 2 steps
                raise ValueError(text)
            return ratio
        number = float(text)
        if re.fullmatch(r"[+-]?\d+", text):
            return int(text)
        return number if number <= 1 else _integral_or_fail(number, text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a step count, a ratio up to 1 or a percentage like "
                                         f"10%") from None


def _integral_or_fail(number: float, text: str) -> int:
    if number.is_integer():
        return int(number)
    raise ValueError(text)


def resolve_warmup_steps(value, num_training_steps: int, flag: str = "--lr_warmup_steps") -> int:
    """`--lr_warmup_steps` (or `--lr_decay_steps`, `flag`) as steps: an int, a ratio in [0, 1] of the total, or
    "N%" (100% = the whole run, as sd-scripts: any float is a ratio there)."""
    if value is None:
        return 0
    if isinstance(value, str):
        try:
            value = int_or_float(value)
        except argparse.ArgumentTypeError as e:
            raise TrainingSetupError(f"{flag}: {e}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TrainingSetupError(f"{flag} must be a number or a percentage, got {value!r}")
    if value < 0:
        raise TrainingSetupError(f"{flag} must not be negative, got {value}")
    if isinstance(value, float):
        if value <= 1:
            return int(value * num_training_steps)
        if not value.is_integer():
            raise TrainingSetupError(
                f"{flag} {value}: use a whole number of steps, a ratio up to 1 (0.1) or a percentage up to 100% (10%)"
            )
    return int(value)


def _schedule_steps(value, total: int, num_processes: int, flag: str) -> int:
    """A step count of the schedule (`--lr_warmup_steps`, `--lr_decay_steps`) in scheduler steps: a ratio of
    `total` (already in scheduler steps), or optimizer steps times `num_processes`."""
    if isinstance(value, str):
        try:
            value = int_or_float(value)
        except argparse.ArgumentTypeError as e:
            raise TrainingSetupError(f"{flag}: {e}") from None
    if isinstance(value, float) and value <= 1:
        return resolve_warmup_steps(value, total, flag)
    return resolve_warmup_steps(value, total, flag) * num_processes


def get_lr_scheduler(args, optimizer, num_training_steps: int, num_processes: int = 1):
    """The LR schedule (sd-scripts `get_scheduler_fix`), built with diffusers' schedule functions.

    `--lr_scheduler` constant | constant_with_warmup | linear | cosine | cosine_with_restarts
    (`--lr_scheduler_num_cycles`) | polynomial (`--lr_scheduler_power`) | adafactor[:lr] (with Adafactor);
    `--lr_scheduler_args k=v` go to the schedule function; `--lr_scheduler_type module.Class` builds any
    scheduler class from `--lr_scheduler_args`.
    `num_processes`: how often the schedule is stepped per optimizer step. accelerate's prepared scheduler
    steps once per process, so like sd-scripts every step count is multiplied by it. Unlike sd-scripts, an
    integer `--lr_warmup_steps` is multiplied too, so it always means optimizer steps (sd-scripts' integer
    warmup shrinks with the number of GPUs; identical on one GPU).
    Warmup with `constant` is an error, as in sd-scripts.
    """
    name = _arg(args, "lr_scheduler", "constant")
    num_processes = max(1, int(num_processes))
    total = int(num_training_steps) * num_processes
    warmup_arg = getattr(args, "lr_warmup_steps", None)
    warmup = _schedule_steps(warmup_arg, total, num_processes, "--lr_warmup_steps")
    if warmup > total:
        logger.warning(f"--lr_warmup_steps ({warmup_arg}) is longer than the training ({num_training_steps} steps)")
    sched_kwargs = parse_kv_args(getattr(args, "lr_scheduler_args", None), "--lr_scheduler_args")

    if is_schedule_free(optimizer):  # sd-scripts: a do-nothing schedule; the optimizer has its own warmup
        if name != "constant" or warmup_arg or getattr(args, "lr_scheduler_type", None):
            logger.warning("a schedule-free optimizer sets its learning rate itself: --lr_scheduler, "
                           "--lr_scheduler_type and --lr_warmup_steps are not used (its warmup: --optimizer_args "
                           "warmup_steps=N)")
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    custom = getattr(args, "lr_scheduler_type", None)
    if custom:
        if warmup:  # sd-scripts refuses this too: the class gets --lr_scheduler_args only
            raise TrainingSetupError(f"--lr_scheduler_type {custom} is built from --lr_scheduler_args alone, so "
                                     f"--lr_warmup_steps ({warmup_arg}) would not be used: drop it, or give the "
                                     "schedule its own warmup argument")
        if "." in custom:
            module_name, class_name = custom.rsplit(".", 1)
            try:
                cls = getattr(importlib.import_module(module_name), class_name)
            except (ImportError, AttributeError) as e:
                raise TrainingSetupError(f"--lr_scheduler_type {custom}: cannot import it ({e})") from None
        else:
            cls = getattr(torch.optim.lr_scheduler, custom, None)
            if cls is None:
                raise TrainingSetupError(f"--lr_scheduler_type {custom} is not a torch.optim.lr_scheduler class")
        try:
            return cls(optimizer, **sched_kwargs)
        except TypeError as e:
            raise TrainingSetupError(f"--lr_scheduler_type {custom} rejected --lr_scheduler_args {sched_kwargs}: {e}") from None

    def no_warmup(what: str):
        if warmup:
            raise TrainingSetupError(
                f"--lr_scheduler {what} does not use --lr_warmup_steps (got {warmup_arg}): use --lr_scheduler "
                "constant_with_warmup (or linear/cosine/...), or set --lr_warmup_steps 0"
            )

    if name.startswith("adafactor"):
        from transformers.optimization import Adafactor, AdafactorSchedule

        if not isinstance(optimizer, Adafactor):
            raise TrainingSetupError("--lr_scheduler adafactor only works with --optimizer_type Adafactor")
        if warmup:
            raise TrainingSetupError(
                f"Adafactor's own schedule (relative_step, its default) has no warmup (--lr_warmup_steps {warmup_arg}): "
                "pass --optimizer_args relative_step=False scale_parameter=False warmup_init=False to train with "
                "--lr_scheduler and its warmup, or leave --lr_warmup_steps out")
        initial_lr = name.split(":", 1)[1] if ":" in name else None
        initial_lr = float(initial_lr) if initial_lr not in (None, "", "None") else 0.0
        return AdafactorSchedule(optimizer, initial_lr)

    from diffusers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    if name not in SCHEDULER_CHOICES:
        close = difflib.get_close_matches(name, SCHEDULER_CHOICES, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise TrainingSetupError(
            f"--lr_scheduler {name!r} is not supported{hint}; choose one of {', '.join(SCHEDULER_CHOICES)}"
        )
    try:
        if name in TRANSFORMERS_SCHEDULERS:
            return _transformers_schedule(name, args, optimizer, warmup, total, num_processes, sched_kwargs)
        fn = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
        if name == "constant":
            no_warmup(name)
            return fn(optimizer, **sched_kwargs)
        if name == "piecewise_constant":  # --lr_scheduler_args step_rules="1:10,0.1"
            if warmup:  # sd-scripts ignores it silently
                logger.warning("--lr_scheduler piecewise_constant ignores --lr_warmup_steps %s, as in sd-scripts: put "
                               "a warmup in its step_rules", warmup_arg)
            return fn(optimizer, **sched_kwargs)
        if name == "constant_with_warmup":
            return fn(optimizer, num_warmup_steps=warmup, **sched_kwargs)
        common = dict(num_warmup_steps=warmup, num_training_steps=total)
        if name == "cosine_with_restarts":
            return fn(optimizer, num_cycles=int(_arg(args, "lr_scheduler_num_cycles", 1)), **common, **sched_kwargs)
        if name == "polynomial":
            return fn(optimizer, power=float(_arg(args, "lr_scheduler_power", 1.0)), **common, **sched_kwargs)
        return fn(optimizer, **common, **sched_kwargs)
    except (TypeError, ValueError) as e:
        raise TrainingSetupError(f"--lr_scheduler {name}: {e}; check --lr_scheduler_args and --learning_rate") from None
