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


def stopping_cnn(num_classes: int) -> nn.Module:
    import os

    return _StopAt(tiny_cnn(num_classes), int(os.environ.get("TINY_STOP_AT", "0")))
