"""The training loop: one short `fit`, features in callbacks.

Data lives in memory as one tensor per split; a batch is an index slice of it (no DataLoader:
for 47 MB of images a per-sample loader only adds overhead). Metrics accumulate in tensors and
are read once per epoch, so the loop never waits on a per-batch `.item()`.

>>> trainer = Trainer(load_config("model1"), splits)          # doctest: +SKIP
>>> history = trainer.fit()                                   # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from . import distributed
from .. import devices, fileio
from ..models import kernels
from ..data.augment import augment_batch
from ..models.build import KerasSequential, build_model
from ..models.cpu_pass import accelerate, is_accelerated
from ..models.spec import check_memory
from .config import RunConfig
from ..data.fashion_mnist import Splits
from ..errors import Interrupted, NonFiniteLoss, UserError
from .optim import lr_at, make_optimizer, set_lr

# How often (in batches) the loop checks the recorded losses for NaN/Inf: one read per window.
NAN_CHECK_EVERY = 32
# Seed offset between the augmentation and dropout generators of successive processes.
PROCESS_SEED_STRIDE = 7919


def module_device(model: torch.nn.Module) -> torch.device:
    """Where a module's parameters live (the CPU for one without parameters)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def prepare_model(model: torch.nn.Module, device: torch.device,
                  cpu_kernels: bool = True) -> torch.nn.Module:
    """`model` moved to `device`; on the CPU with `cpu_kernels`, given the CPU pass
    (models.cpu_pass.accelerate: the same function, computed faster). In place, as .to()."""
    model.to(device)
    if device.type == "cpu" and cpu_kernels:
        accelerate(model)
    return model


def configure_device(device: torch.device, deterministic: bool) -> None:
    """CUDA: cuDNN picks its fastest algorithms per shape (benchmark) unless the run asks for
    deterministic ones, which also needs cuBLAS's fixed workspace."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


@dataclass
class TrainState:
    """Everything besides weights and optimizer moments that a resume needs."""

    epoch: int = 0              # completed epochs
    step: int = 0               # optimizer steps taken
    batch_in_epoch: int = 0     # batches done in the unfinished epoch (mid-epoch checkpoint)
    cursor: int = 0             # next position in `perm`
    perm: torch.Tensor | None = None  # current shuffle of the training indices, int64 (N,)
    sums: torch.Tensor = field(default_factory=lambda: torch.zeros(4, dtype=torch.float64))
    # sums = [sum of batch loss * batch size, sum of penalty * batch size, correct, seen]
    epoch_seconds: float = 0.0  # time already spent in the unfinished epoch
    history: list[dict] = field(default_factory=list)


class Trainer:
    """Holds the model, optimizer, generators and state of one run; `fit()` trains it.

    `model` is built from `config.model` when not given; it may be any torch.nn.Module that
    maps float32 images (N, C, H, W) to logits (N, n_classes) (see check_module). Keras
    regularizer penalties (has_regularizers, regularization_penalty) and the CPU pass
    (models.cpu_pass, with train.cpu_kernels) apply to spec models.

    `config.train.device` says where it trains ("auto", "cpu", "cuda:1"...): the model and the
    splits move there once, batches are index slices there, and the random generators of the
    shuffle and augmentation stay on the CPU (their draws are small), so a seed means the same
    on every device. Dropout draws from the device's own global generator.

    Callbacks are plain objects with any of: on_train_begin(trainer), on_epoch_begin(trainer,
    epoch), on_batch_end(trainer, batch, steps), on_epoch_end(trainer, epoch, logs),
    on_interrupt(trainer), on_train_end(trainer), and, once a run is evaluated (run.py),
    on_run_end(trainer, result). `epoch` is 0-based; logs is a flat dict.
    """

    def __init__(self, config: RunConfig, splits: Splits, callbacks=(),
                 model: torch.nn.Module | None = None, run_dir=None):
        self.config = config
        self.splits = splits
        self.callbacks = list(callbacks)
        self.run_dir = run_dir  # the RunDir this run writes, if any (callbacks read it)
        t = config.train
        # several processes (torchrun): this one's rank; see distributed.py
        self.rank, self.world = distributed.world()
        if t.threads or self.world > 1:
            torch.set_num_threads(t.threads or distributed.default_threads())
        self.device = distributed.process_device(devices.resolve_device(t.device))
        configure_device(self.device, t.deterministic)
        if model is None:
            if config.model is None:
                raise UserError(module_needed(config.module, "Trainer's model="),
                                setting="model")
            check_memory(config.model, t.batch_size, t.eval_batch_size)  # before allocating
            model = build_model(config.model, seed=t.seed)
        elif not isinstance(model, KerasSequential):
            check_module(model, splits, t.seed)
        self.model = prepare_model(model, self.device, t.cpu_kernels)
        self.splits = splits = splits.to(self.device)
        self.optimizer = make_optimizer(self.model, t)
        # fp16 gradients underflow without loss scaling (bf16 has float32's exponent range)
        self.grad_scaler = (torch.amp.GradScaler(self.device.type)
                            if devices.needs_grad_scaler(self.device, t.precision) else None)
        # the shuffle is common to all processes; augmentation and dropout are drawn per process
        # (process 0 draws as a single process does)
        other = PROCESS_SEED_STRIDE * self.rank
        self.shuffle_gen = torch.Generator().manual_seed(t.seed * 1000 + 1)
        self.augment_gen = torch.Generator().manual_seed(t.seed * 1000 + 2 + other)
        torch.manual_seed(t.seed * 1000 + 3 + other)  # the global generator drives dropout
        self.process_rng_states: list[dict] | None = None  # every process's, for checkpoints
        self.state = TrainState(sums=self.zero_sums())
        self.stop_training = False     # set by callbacks (early stopping), as in Keras
        self.stop_request: str | None = None  # set by signal handlers: stop at next batch
        self.stop_reason: str | None = None   # set by callbacks that stop training, for the log
        self.interrupt_checkpoint = None      # set by ModelCheckpoint.on_interrupt
        self.last_checkpoint = None           # newest checkpoint written or resumed from
        # test hook (fileio.fault_hook): pause at a batch boundary so a test can kill the process
        self._pause_hook = os.environ.get("FASHION_CNN_PAUSE_AT") == "batch"
        if is_accelerated(self.model) and self.model.use_fused_kernels:
            kernels.available()  # compile the C kernels now, not inside the first epoch
        self.forward = torch.compile(self.model) if t.compile else self.model
        if self.world > 1:
            if t.compile:
                raise UserError("compiling (train.compile) is not supported with several processes",
                                setting="train.compile")
            if t.batch_size < self.world:
                raise UserError(f"batch size {t.batch_size} is smaller than the {self.world} "
                                f"processes sharing each batch")
            self.forward = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
        self.compile_seconds = 0.0
        n = len(splits.x_train)
        self.full_steps = math.ceil(n / t.batch_size)
        self.steps_per_epoch = max(1, int(self.full_steps * t.steps_fraction))

    # ------------------------------------------------------------------ callbacks
    def call(self, hook: str, *args) -> None:
        """Call `hook` on every callback that defines it, in order."""
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(self, *args)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.train.epochs

    def zero_sums(self) -> torch.Tensor:
        """The epoch's running sums (see TrainState), on the training device so that adding
        a batch's figures never waits for it; float32 on MPS, which has no float64."""
        dtype = torch.float32 if self.device.type == "mps" else torch.float64
        return torch.zeros(4, dtype=dtype, device=self.device)

    def autocast(self):
        return devices.autocast(self.device, self.config.train.precision)

    # ------------------------------------------------------------------ batches
    def _next_indices(self) -> torch.Tensor:
        """The next batch of a never-ending stream of shuffles (Keras' iterator semantics)."""
        s, n = self.state, len(self.splits.x_train)
        if s.perm is None or s.cursor >= n:
            s.perm = torch.randperm(n, generator=self.shuffle_gen)
            s.cursor = 0
        idx = s.perm[s.cursor:s.cursor + self.config.train.batch_size]
        s.cursor += len(idx)
        return idx

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(images, labels) of this process's share of the next batch, and the whole batch's
        size (over all processes)."""
        idx = self._next_indices()
        size = len(idx)
        if self.world > 1:
            idx = idx.tensor_split(self.world)[self.rank]
        idx = idx.to(self.device, non_blocking=True)
        x = self.splits.train_batch(idx)  # (B, C, H, W) float32
        if self.config.augment.enabled:
            x = augment_batch(x, self.config.augment, self.augment_gen)
        return x, self.splits.y_train[idx], size

    def _compile_warmup(self) -> None:
        """Trigger torch.compile's compilation outside the timed epochs, RNG untouched."""
        x = self.splits.train_batch(slice(0, self.config.train.batch_size))
        start = time.perf_counter()
        fork = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork), self.autocast():
            self.forward(x).float().sum().backward()
        self.optimizer.zero_grad(set_to_none=True)
        self.compile_seconds = time.perf_counter() - start

    # ------------------------------------------------------------------ training
    def fit(self) -> list[dict]:
        """Train until `config.train.epochs` epochs are complete (or a callback stops it)."""
        if self.config.train.compile and not self.compile_seconds:
            self._compile_warmup()
        self.call("on_train_begin")
        while self.state.epoch < self.config.train.epochs and not self.stop_training:
            epoch = self.state.epoch
            self.call("on_epoch_begin", epoch)
            logs = self.train_one_epoch()
            if self.rank == 0:  # several processes: process 0 validates, and tells the others
                logs.update({f"val_{k}": v for k, v in self.evaluate_split("val").items()})
            if self.world > 1:
                logs = distributed.broadcast(logs)
                self.process_rng_states = distributed.gather(self._rng_state())
            self.state.history.append(logs)
            self.call("on_epoch_end", epoch, logs)
            if self.world > 1:  # process 0's callbacks may have stopped training
                self.stop_training = distributed.broadcast(self.stop_training)
        self.call("on_train_end")
        return self.state.history

    def train_one_epoch(self) -> dict:
        s = self.state
        self.model.train()
        started = time.perf_counter() - s.epoch_seconds
        # per-batch loss, read only for the NaN guard (on the device: no wait per batch)
        losses = torch.zeros(self.steps_per_epoch, device=self.device)
        checked = s.batch_in_epoch
        regularized = bool(getattr(self.model, "has_regularizers", False))  # spec models only
        while s.batch_in_epoch < self.steps_per_epoch:
            if self._pause_hook:
                fileio.fault_hook("batch", f"epoch={s.epoch + 1},batch={s.batch_in_epoch};",
                                   until=lambda: self.stop_request is not None)
            if self.world > 1:
                self._agree_on_stop()
            if self.stop_request:
                self._stop_at_batch(losses, checked, started)
            losses[s.batch_in_epoch] = self._step(regularized)
            s.batch_in_epoch += 1
            s.step += 1
            if s.batch_in_epoch - checked >= NAN_CHECK_EVERY or s.batch_in_epoch == self.steps_per_epoch:
                self._check_finite(losses, checked, s.batch_in_epoch)
                checked = s.batch_in_epoch
            self.call("on_batch_end", s.batch_in_epoch, self.steps_per_epoch)
        sums = distributed.all_reduce(s.sums.clone()) if self.world > 1 else s.sums
        loss_sum, penalty_sum, correct, seen = sums.double().tolist()
        logs = {"epoch": s.epoch + 1, "loss": loss_sum / seen, "accuracy": correct / seen,
                "penalty": penalty_sum / seen, "lr": self.optimizer.param_groups[0]["lr"]}
        s.epoch += 1
        s.batch_in_epoch = 0
        s.sums = self.zero_sums()
        s.epoch_seconds = 0.0
        logs["seconds"] = time.perf_counter() - started
        return logs

    def _step(self, regularized: bool) -> torch.Tensor:
        """One optimizer step on the next batch; adds its loss, penalty and correct count to
        the epoch's sums; the batch's loss (a 0-dim tensor, not read here: no host sync)."""
        cfg, s, model = self.config.train, self.state, self.model
        set_lr(self.optimizer, lr_at(s.step, self.total_steps, cfg))
        x, y, batch_size = self._batch()
        with self.autocast():
            logits = self.forward(x)
        if self.world == 1:
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        else:
            # this share's sum, weighted so that DistributedDataParallel's mean over the
            # processes is the gradient of the whole batch's mean loss
            loss_sum = F.cross_entropy(logits.float(), y, reduction="sum",
                                       label_smoothing=cfg.label_smoothing)
            loss = loss_sum * (self.world / batch_size)
        penalty = model.regularization_penalty() if regularized else None
        total = loss + penalty if penalty is not None else loss
        self._clear_grads()
        if self.grad_scaler is None:
            total.backward()
            self.optimizer.step()
        else:  # fp16: a scaled loss, a step skipped (and the scale lowered) on inf/NaN grads
            self.grad_scaler.scale(total).backward()
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        with torch.no_grad():
            n, dtype = y.numel(), s.sums.dtype
            if self.world > 1:  # the share's loss sum, as a single process counts it
                loss_sum = loss_sum.detach()
                total_n = (loss_sum + penalty.detach() * n if penalty is not None
                           else loss_sum).to(dtype)
            else:
                total_n = total.detach().to(dtype) * n
            penalty_n = (penalty.detach().to(dtype) * n if penalty is not None
                         else torch.zeros((), dtype=dtype, device=self.device))
            s.sums += torch.stack([total_n, penalty_n, (logits.argmax(1) == y).sum().to(dtype),
                                   torch.full((), n, dtype=dtype, device=self.device)])
        return total.detach()

    def _stop_at_batch(self, losses: torch.Tensor, checked: int, started: float) -> None:
        """A stop was asked for (a signal): checkpoint here, between batches, and raise
        Interrupted."""
        s = self.state
        # never checkpoint weights that a non-finite loss has already spoiled
        self._check_finite(losses, checked, s.batch_in_epoch)
        s.epoch_seconds = time.perf_counter() - started
        if self.world > 1:  # process 0 checkpoints: every process's state, and sums
            self.process_rng_states = distributed.gather(self._rng_state())
            distributed.all_reduce(s.sums)
        self.call("on_interrupt")
        distributed.barrier()  # the others exit once process 0's checkpoint is written
        raise Interrupted(f"stopped by {self.stop_request} at epoch {s.epoch + 1}, batch "
                          f"{s.batch_in_epoch} of {self.steps_per_epoch}", self.stop_request)

    def _clear_grads(self) -> None:
        """optimizer.zero_grad(set_to_none=True) without its wrapper (a profiler label and a
        loop over groups: about 0.1 ms of a training step here)."""
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                param.grad = None

    def _check_finite(self, losses: torch.Tensor, start: int, end: int) -> None:
        window = losses[start:end]
        finite = bool(torch.isfinite(window).all())
        if self.world > 1:  # all processes stop together, whichever saw it
            flag = distributed.all_reduce(torch.tensor([float(finite)]), "min")
            if finite and not flag.item():
                self.stop_training = True
                raise NonFiniteLoss(f"non-finite loss in another process at epoch "
                                    f"{self.state.epoch + 1}; training stopped")
        if not finite:
            bad = start + int((~torch.isfinite(window)).nonzero()[0])
            self.stop_training = True
            kept = (f"the last checkpoint, {self.last_checkpoint}, is intact"
                    if self.last_checkpoint is not None else "no checkpoint had been written yet")
            raise NonFiniteLoss(
                f"non-finite loss ({float(losses[bad])}) at epoch {self.state.epoch + 1}, "
                f"batch {bad + 1}; training stopped (try a lower learning rate, train.lr); "
                f"{kept}")

    def _agree_on_stop(self) -> None:
        """Several processes: a stop asked of any one (a signal) stops all at this batch."""
        flag = distributed.all_reduce(torch.tensor([float(bool(self.stop_request))]), "max")
        if flag.item() and not self.stop_request:
            self.stop_request = "SIGTERM"  # another process's signal; exit as if ours

    def _rng_state(self) -> dict:
        """This process's generators that differ between processes (see __init__): the CPU's
        global one, the augmentation's, and the device's global one where it is not the CPU
        (dropout draws from it)."""
        states = {"global": torch.get_rng_state(), "augment": self.augment_gen.get_state()}
        device_state = devices.get_rng_state(self.device)
        if device_state is not None:
            states[self.device.type] = device_state
        return states

    # ------------------------------------------------------------------ evaluation
    def evaluate_split(self, split: str, tta: str = "none") -> dict:
        x, y = getattr(self.splits, f"x_{split}"), getattr(self.splits, f"y_{split}")
        if len(x) == 0:
            return {}
        result = evaluate(self.model, x, y, self.config.train.eval_batch_size,
                          self.config.train.precision, tta)
        if getattr(self.model, "has_regularizers", False):  # Keras counts it in val_loss too
            with torch.no_grad():
                result["loss"] += float(self.model.regularization_penalty())
        return {"loss": result["loss"], "accuracy": result["accuracy"]}


def module_needed(info, how: str) -> str:
    """The one-line reason a run or config of a plain module cannot go on without it."""
    what = f" ({info.qualname}, {info.params:,} parameters)" if info is not None else ""
    return (f"the run's model is a plain PyTorch module{what}, which only Python code can "
            f"rebuild: pass a new one as {how}")


def check_module(model, splits: Splits, seed: int = 0) -> None:
    """Check that a plain module maps two training images (2, C, H, W) float32 to logits
    (2, n_classes); UserError (setting "model") saying what it returned otherwise.

    Runs in eval mode without gradients and leaves the global generator as it was, so training
    is unchanged; a lazy module (nn.LazyLinear...) is initialized here, from `seed`.
    """
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"model must be a torch.nn.Module, got {type(model).__name__}",
                        setting="model")
    if len(splits.x_train) < 2:
        return
    # (2, C, H, W) float32, channels_last as evaluation passes it (x.view(N, -1) fails there)
    x = splits.train_batch(slice(0, 2)).to(module_device(model)).contiguous(
        memory_format=torch.channels_last)
    classes = int(splits.y_train.max()) + 1
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            out = model(x)
    except Exception as exc:  # any error of user code: one line, the module's own words
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UserError(f"model: its forward pass failed on a batch of shape {tuple(x.shape)} "
                        f"({type(exc).__name__}: {first})", setting="model") from None
    finally:
        model.train(was_training)
    if (not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2
            or out.shape[1] < classes or not out.is_floating_point()):
        got = (f"shape {tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor)
               else type(out).__name__)
        raise UserError(f"model: for images of shape {tuple(x.shape)} it returned {got}; it "
                        f"must return float logits of shape (N, {classes})", setting="model")


def tta_views(batch: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """The views of a batch (B, C, H, W) whose logits test-time augmentation averages.

    "shift": the batch itself and the batch moved by one pixel up, down, left and right, the
    vacated row or column repeating its neighbour (the background at the border).
    "flip": the batch and its mirror image (left-right). All footwear in Fashion-MNIST faces one
    way, so use it only for a model trained with `horizontal_flip`, to which a mirrored shoe is
    a familiar image (benchmarks/RESULTS.md has the measurement).
    """
    if tta == "none":
        return [batch]
    if tta == "flip":
        return [batch, batch.flip(-1).contiguous(memory_format=torch.channels_last)]
    height, width = batch.shape[-2:]
    views = [batch]
    for left, right, top, bottom in ((1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1)):
        padded = F.pad(batch, (left, right, top, bottom), mode="replicate")
        views.append(padded[..., bottom:bottom + height, right:right + width]
                     .contiguous(memory_format=torch.channels_last))
    return views


def predict_logits(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 256,
                   precision: str = "fp32", tta: str = "none") -> torch.Tensor:
    """Logits (N, n_classes) in float32, in eval mode and inference mode, in large batches;
    with `tta`, the mean of the logits of each view (see tta_views)."""
    return _predict(model, x, batch_size, precision, tta)[0]


def _predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int,
             precision: str, tta: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean logits over the TTA views, logits of the plain images), both (N, n_classes) float32
    on the CPU. The first view is the plain batch, so the plain logits come from the same pass.
    Batches of `x` (on any device) are computed where the model lives."""
    was_training = model.training
    model.eval()
    device = module_device(model)
    means, plains = [], []
    with torch.inference_mode(), devices.autocast(device, precision):
        for start in range(0, len(x), batch_size):
            batch = x[start:start + batch_size].to(device).contiguous(
                memory_format=torch.channels_last)
            views = tta_views(batch, tta)
            plain = model(views[0]).float()
            logits = plain
            for view in views[1:]:
                logits = logits + model(view).float()  # out of place: `plain` stays as it is
            means.append(logits / len(views))
            plains.append(plain)
    model.train(was_training)
    if not means:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(means).cpu(), torch.cat(plains).cpu()


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256,
             precision: str = "fp32", tta: str = "none") -> dict:
    """Mean cross-entropy (without regularization penalty), accuracy and predictions; with
    `tta`, also the accuracy of the plain images alone (`accuracy_without_tta`)."""
    logits, plain = _predict(model, x, batch_size, precision, tta)
    y = y.cpu()
    loss = F.cross_entropy(logits, y, reduction="sum").item() / max(1, len(y))
    predictions = logits.argmax(1)
    correct = int((predictions == y).sum())
    extra = {}
    if tta != "none":
        extra["accuracy_without_tta"] = int((plain.argmax(1) == y).sum()) / max(1, len(y))
    return {"loss": loss, "accuracy": correct / max(1, len(y)), "correct": correct,
            "predictions": predictions, "logits": logits, **extra}
