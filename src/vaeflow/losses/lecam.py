"""LeCAM regularization of the discriminator (Tseng et al., CVPR 2021).

    R_LC = E[relu(D(x) - a_F)^2] + E[relu(a_R - D(G(z)))^2]

with a_R, a_F exponential moving averages of D's mean output on real and on fake images
(the official implementation's one-sided form). It keeps D's outputs near their running
means, which bounds the hinge loss's margins: recommended when D overfits a small data set.

The moving averages are state: they go into checkpoints (`state_dict`) and, like any
discriminator update, are only advanced when the optimizer step is taken (`commit`),
not when the guard skips it (`discard`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DECAY = 0.99  # the paper's EMA decay


class LeCAM(nn.Module):
    def __init__(self, decay: float = DECAY):
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._pending: list[torch.Tensor] = []  # [sum real, sum fake, count] per observed micro-batch

    def forward(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        """The penalty against the current averages (fp32); remembers the batch means for `commit`."""
        with torch.autocast(device_type=logits_real.device.type, enabled=False):  # fp32 under AMP
            real, fake = logits_real.float(), logits_fake.float()
            # sums and counts, not means: unequal micro-batches weigh by their size
            n = torch.tensor(float(real.numel()), device=real.device)
            self._pending.append(torch.stack([real.detach().sum(), fake.detach().sum(), n]))  # one chunk: as many real as fake
            ema_real, ema_fake = self.ema_real.to(real.device), self.ema_fake.to(real.device)
            penalty = F.relu(real - ema_fake).pow(2).mean() + F.relu(ema_real - fake).pow(2).mean()
            return penalty * self.initialized.to(real.device)  # 0 before the first commit: no averages yet

    @torch.no_grad()
    def commit(self, reduce=None) -> None:
        """Fold the observed means into the averages; `reduce` (e.g. a cross-rank mean) is
        applied to [mean real, mean fake] first."""
        if not self._pending:
            return
        total = torch.stack(self._pending).sum(0).to(self.ema_real.device)
        means = total[:2] / total[2]
        self._pending = []
        if reduce is not None:
            means = reduce(means)
        if not bool(self.initialized):
            self.ema_real.copy_(means[0])
            self.ema_fake.copy_(means[1])
            self.initialized.fill_(True)
            return
        self.ema_real.lerp_(means[0], 1 - self.decay)
        self.ema_fake.lerp_(means[1], 1 - self.decay)

    def discard(self) -> None:
        self._pending = []

    def pending_mark(self) -> int:
        return len(self._pending)

    def truncate_pending(self, mark: int) -> None:
        """Forget what was observed since `mark` (a batch started over after out-of-memory)."""
        del self._pending[mark:]
