"""Tiny models for tests, loaded through dalikd's ``module:function`` model names."""

from torch import nn


def tiny_cnn(num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )


def tiny_cnn_wide(num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )


class _Slow(nn.Module):
    """Sleeps in forward so a subprocess run lasts long enough to be signalled mid-epoch."""

    def __init__(self, inner: nn.Module, seconds: float) -> None:
        super().__init__()
        self.inner = inner
        self.seconds = seconds

    def forward(self, x):
        import time

        time.sleep(self.seconds)
        return self.inner(x)


def slow_cnn(num_classes: int) -> nn.Module:
    return _Slow(tiny_cnn(num_classes), 0.04)


class _StopAt(nn.Module):
    """Sends SIGUSR1 to its own process at its ``stop_at``-th training forward (0: never), so
    an in-process run stops mid-epoch through dalikd's stop handling (a preemption)."""

    def __init__(self, inner: nn.Module, stop_at: int) -> None:
        super().__init__()
        self.inner = inner
        self.stop_at = stop_at
        self.calls = 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == self.stop_at:
                import os
                import signal

                os.kill(os.getpid(), signal.SIGUSR1)
        return self.inner(x)


class _StopInVal(nn.Module):
    """Sends SIGUSR1 to its own process at its first evaluation forward (a preemption that
    arrives while the run validates)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.sent = False

    def forward(self, x):
        if not self.training and not self.sent:
            import os
            import signal

            self.sent = True
            os.kill(os.getpid(), signal.SIGUSR1)
        return self.inner(x)


def stopping_in_val_cnn(num_classes: int) -> nn.Module:
    return _StopInVal(tiny_cnn(num_classes))


def stopping_cnn(num_classes: int) -> nn.Module:
    import os

    return _StopAt(tiny_cnn(num_classes), int(os.environ.get("TINY_STOP_AT", "0")))


class Recording(nn.Module):
    """tiny_cnn that records the mean RGB (0-255) of every image it trains on, so a test can
    count which images a run saw. ``seen`` is reset by the test."""

    seen: list[tuple[int, int, int]] = []
    stop_at: int | None = None  # SIGTERM this process once this many images were seen
    hook = None  # called with len(seen) after each training forward (a test's snapshot)

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.inner = tiny_cnn(num_classes)

    def forward(self, x):
        if self.training:
            import torch

            mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
            std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
            rgb = (x.detach().float().cpu() * std + mean).mean(dim=(2, 3)).round().int()
            Recording.seen += [tuple(v) for v in rgb.tolist()]
            if len(Recording.seen) == Recording.stop_at:
                import os
                import signal

                os.kill(os.getpid(), signal.SIGTERM)  # the loop stops after this step
            if Recording.hook is not None:
                Recording.hook(len(Recording.seen))
        return self.inner(x)


def recording_cnn(num_classes: int) -> nn.Module:
    return Recording(num_classes)


class _FailOnRank(nn.Module):
    """Raises a DalikdError at its ``at``-th training forward on rank ``rank`` only (the RANK
    torchrun sets), as a rank-specific failure would: the other ranks must not bury its line."""

    def __init__(self, inner: nn.Module, rank: int, at: int) -> None:
        super().__init__()
        self.inner, self.rank, self.at, self.calls = inner, rank, at, 0

    def forward(self, x):
        import os

        if self.training and int(os.environ.get("RANK", "0")) == self.rank:
            self.calls += 1
            if self.calls == self.at:
                from dalikd.errors import DalikdError

                raise DalikdError("a failure of this rank alone")
        return self.inner(x)


def failing_on_rank1(num_classes: int) -> nn.Module:
    return _FailOnRank(tiny_cnn(num_classes), 1, 3)
