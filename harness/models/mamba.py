"""Mamba-1 (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces") and
Mamba-2 (Dao & Gu 2024, "Transformers are SSMs", the SSD layer).

Both are registered families ("mamba", "mamba2") built from this one file; `version` picks the
mixer. Each block is norm -> mixer -> residual with no channel mixer, so, as in the Mamba paper
(Sec. 4.2, Table 12), a Mamba model has two mixer blocks where a Transformer has attention + MLP:
size a Mamba to match a Transformer of depth n with `n_layers = LAYERS_PER_TRANSFORMER_LAYER * n`
at the same d_model (the parameter counts then match closely at expand = 2).

Mamba-1 mixer: in_proj -> (x, z); x -> causal depthwise conv -> SiLU -> selective SSM with
input-dependent Delta (softplus(dt_proj(.))), B, C; A = -exp(A_log), D skip; y * SiLU(z) -> out_proj.
Mamba-2 mixer: in_proj -> (z, xBC, dt); xBC -> conv -> SiLU -> SSD with one scalar decay per head
(one group of B and C shared by all heads); RMSNorm(y * SiLU(z)) -> out_proj.

Backends: "auto" runs mamba-ssm's kernels on CUDA when they load (Mamba-1's needs mamba-ssm's
compiled extension; an install without it warns once and runs the PyTorch scan); on CPU, the
fused C scans of `harness/ops/csrc/selective_scan.c` (Mamba-1) and `ssd_scan.c` (Mamba-2), built
at first use (see `harness.ops.native`), falling back to the PyTorch scans where no C compiler is.
"torch", "native" and "cuda" force one. The first forward logs the scan it runs
(`harness.ops.kernels.note`). The short causal conv is `nn.Conv1d` on every device. Blocks
compile with torch.compile; each scan kernel runs between compiled graphs (a graph break).

Deviations: the shared backbone ties the head to the embedding and scales residual output
projections by 1/sqrt(2 n_layers) (the paper's GPT-2 style init, also what mamba-ssm does);
Mamba-2 uses d_state 64 by default instead of 128, which suits the small widths this harness runs.

FLOP accounting: every matmul and the depthwise conv are counted exactly as the built model runs
them. Mamba-1's selective scan has no matmul form and is counted as "ew_scan" (9 d_inner d_state
per token, mamba-ssm's own count). Mamba-2's chunked SSD is four batched matmuls whose cost
depends on chunk_size: counted exactly as "ssd" for the chunk length and padding of the chunked
path (the mamba-ssm Triton kernels run the same chunked algorithm), its elementwise rest as "ew_ssd".
That is the count for the chunked algorithm (what mamba-ssm's kernels run); the CPU kernel
(`ssd_scan_native`) runs the recurrence instead, 4 H P N FLOPs per token forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.layers import LM, Block, LMConfig, embedding_params, head_flops, norm_params
from harness.ops import kernels, scan

LAYERS_PER_TRANSFORMER_LAYER = 2

_SCANS = {
    1: {"torch": scan.selective_scan, "native": scan.selective_scan_native, "cuda": scan.selective_scan_cuda},
    2: {"torch": scan.ssd_scan, "native": scan.ssd_scan_native, "cuda": scan.ssd_scan_cuda},
}
_KERNELS = {"torch": "torch", "native": "C (harness/ops/csrc)", "cuda": "mamba-ssm"}  # for kernels.note


@dataclass(kw_only=True)
class MambaConfig(LMConfig):
    family: str = "mamba"
    version: int = 1  # 1: selective scan (Mamba-1); 2: SSD (Mamba-2). Must match the family.
    expand: int = 2  # d_inner = expand * d_model
    d_state: int = 0  # 0: 16 (Mamba-1) or 64 (Mamba-2)
    d_conv: int = 4
    dt_rank: int = 0  # Mamba-1; 0: ceil(d_model / 16)
    head_dim: int = 0  # Mamba-2; 0: min(64, d_inner // 8), or d_inner // n_heads when n_heads is set
    n_heads: int = 0  # Mamba-2; 0: d_inner // head_dim
    chunk_size: int = 64  # chunk length of the CPU scans and of the SSD kernels
    conv_bias: bool = True
    dt_min: float = 0.001  # initial Delta is log-uniform in [dt_min, dt_max]
    dt_max: float = 0.1
    # "torch" | "native" (the C kernels for the CPU) | "cuda" (mamba-ssm kernels) | "auto"
    backend: str = "auto"

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    def __post_init__(self) -> None:
        super().__post_init__()
        want = {"mamba": 1, "mamba2": 2}.get(self.family)
        if self.version != want:
            raise ValueError(
                f"model.version={self.version} does not match family {self.family!r} (needs {want})"
            )
        for f in ("expand", "d_conv", "chunk_size"):
            if getattr(self, f) < 1:
                raise ValueError(f"model.{f} must be >= 1, got {getattr(self, f)}")
        for f in ("d_state", "dt_rank", "head_dim", "n_heads"):
            if getattr(self, f) < 0:
                raise ValueError(
                    f"model.{f} must be >= 0 (0 derives it from d_model), got {getattr(self, f)}"
                )
        if self.backend not in ("torch", "native", "cuda", "auto"):
            raise ValueError(f"model.backend must be torch, native, cuda or auto, got {self.backend!r}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"need 0 < model.dt_min <= model.dt_max, got {self.dt_min}, {self.dt_max}")
        if self.d_state == 0:
            self.d_state = 16 if self.version == 1 else 64
        if self.version == 1:
            if self.dt_rank == 0:
                self.dt_rank = math.ceil(self.d_model / 16)
            return
        di = self.d_inner
        if self.head_dim == 0:
            self.head_dim = di // self.n_heads if self.n_heads else min(64, max(1, di // 8))
        if self.n_heads == 0:
            self.n_heads = di // self.head_dim
        if self.n_heads * self.head_dim != di:
            raise ValueError(
                f"Mamba-2 needs n_heads * head_dim == d_inner = expand * d_model = {di}, "
                f"got n_heads={self.n_heads}, head_dim={self.head_dim}"
            )


@dataclass(kw_only=True)
class Mamba2Config(MambaConfig):
    family: str = "mamba2"
    version: int = 2


def _pick_scan(cfg: MambaConfig, reference: bool, x: torch.Tensor):
    """The scan this forward runs, logged once per family and kernel."""
    name = "selective_scan" if cfg.version == 1 else "ssd_scan"
    backend = scan.pick_backend("torch" if reference else cfg.backend, x, native_kernel=name)
    kernels.note(cfg.family, name, _KERNELS[backend])
    return _SCANS[cfg.version][backend]


def _causal_conv(conv: nn.Conv1d, x_BTC: torch.Tensor) -> torch.Tensor:
    # Left padding only, so the conv produces exactly T outputs (FlopCounterMode then sees
    # 2 C K per token, not 2 C K (T + K - 1) / T as with symmetric padding and a slice).
    x_BCT = F.pad(x_BTC.transpose(1, 2), (conv.kernel_size[0] - 1, 0))
    return conv(x_BCT).transpose(1, 2)


def _conv_step(
    conv: nn.Conv1d, window_BCK: torch.Tensor, x_BC: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of `_causal_conv`: the window holds the last K - 1 inputs."""
    full_BCK = torch.cat([window_BCK, x_BC[..., None]], dim=-1)
    y_BC = (full_BCK * conv.weight[:, 0, :]).sum(-1)
    if conv.bias is not None:
        y_BC = y_BC + conv.bias
    return y_BC, full_BCK[..., 1:]


def _dt_init(n: int, cfg: MambaConfig) -> torch.Tensor:
    """Bias whose softplus is log-uniform in [dt_min, dt_max] (Mamba Sec. 3.6 / mamba-ssm init)."""
    dt = torch.exp(torch.rand(n) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
    return dt + torch.log(-torch.expm1(-dt))  # inverse softplus


class MambaMixer(nn.Module):
    """Mamba-1 selective-SSM mixer (Gu & Dao 2023, Fig. 3)."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        self.reference = False  # tests flip this to run the PyTorch scan (matmuls FlopCounterMode sees)
        di, N, R = cfg.d_inner, cfg.d_state, cfg.dt_rank
        self.in_proj = nn.Linear(cfg.d_model, 2 * di, bias=cfg.bias)
        self.conv1d = nn.Conv1d(di, di, cfg.d_conv, groups=di, bias=cfg.conv_bias)
        self.x_proj = nn.Linear(di, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, di, bias=True)
        # S4D-real init: A_n = -(n + 1) for every channel.
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(di, 1))
        self.D = nn.Parameter(torch.ones(di))
        self.out_proj = nn.Linear(di, cfg.d_model, bias=cfg.bias)
        self.out_proj.is_residual_out = True

    def reset_ssm_parameters(self) -> None:
        """Called after the backbone's generic init, which would zero the Delta bias."""
        nn.init.uniform_(self.dt_proj.weight, -(self.cfg.dt_rank**-0.5), self.cfg.dt_rank**-0.5)
        with torch.no_grad():
            self.dt_proj.bias.copy_(_dt_init(self.cfg.d_inner, self.cfg))

    def _ssm_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        R, N = self.cfg.dt_rank, self.cfg.d_state
        dt, B, C = self.x_proj(x).split([R, N, N], dim=-1)
        return F.softplus(self.dt_proj(dt)), -torch.exp(self.A_log.float()), B, C

    def forward(self, u_BTC: torch.Tensor) -> torch.Tensor:
        x, z = self.in_proj(u_BTC).chunk(2, dim=-1)
        x = F.silu(_causal_conv(self.conv1d, x))
        delta, A, B, C = self._ssm_inputs(x)
        fn = _pick_scan(self.cfg, self.reference, x)
        y, _ = fn(x, delta, A, B, C, self.D.float(), chunk_size=self.cfg.chunk_size, final_state=False)
        return self.out_proj(y * F.silu(z))

    def init_state(self, batch: int, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        di = self.cfg.d_inner
        return (
            torch.zeros(batch, di, self.cfg.d_conv - 1, device=device, dtype=dtype),
            torch.zeros(
                batch, di, self.cfg.d_state, device=device, dtype=torch.promote_types(dtype, torch.float32)
            ),
        )

    def step(self, u_BC: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        """One token: (B, d_model), (conv window, SSM state) -> (B, d_model), new state."""
        window, h = state
        x, z = self.in_proj(u_BC).chunk(2, dim=-1)
        x, window = _conv_step(self.conv1d, window, x)
        x = F.silu(x)
        delta, A, B, C = self._ssm_inputs(x)
        y, h = scan.selective_scan_step(
            h,
            x.to(h.dtype),
            delta.to(h.dtype),
            A.to(h.dtype),
            B.to(h.dtype),
            C.to(h.dtype),
            self.D.to(h.dtype),
        )
        return self.out_proj(y.to(u_BC.dtype) * F.silu(z)), (window, h)


class Mamba2Mixer(nn.Module):
    """Mamba-2 SSD mixer (Dao & Gu 2024, Sec. 7 "parallel" block), one B/C group."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        self.reference = False  # tests flip this to run the PyTorch scan (matmuls FlopCounterMode sees)
        di, N, H = cfg.d_inner, cfg.d_state, cfg.n_heads
        self.conv_dim = di + 2 * N
        self.in_proj = nn.Linear(cfg.d_model, 2 * di + 2 * N + H, bias=cfg.bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, cfg.d_conv, groups=self.conv_dim, bias=cfg.conv_bias
        )
        self.dt_bias = nn.Parameter(_dt_init(H, cfg))
        self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(1, 16)))  # A in [-16, -1]
        self.D = nn.Parameter(torch.ones(H))
        self.norm = nn.RMSNorm(di, eps=1e-6)
        self.out_proj = nn.Linear(di, cfg.d_model, bias=cfg.bias)
        self.out_proj.is_residual_out = True

    def reset_ssm_parameters(self) -> None:
        pass  # dt_bias, A_log and D are plain Parameters: the backbone's init leaves them alone

    def _split(self, zxbcdt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        di = self.cfg.d_inner
        return zxbcdt.split([di, self.conv_dim, self.cfg.n_heads], dim=-1)

    def forward(self, u_BTC: torch.Tensor) -> torch.Tensor:
        Bsz, T, _ = u_BTC.shape
        di, N, H, P = self.cfg.d_inner, self.cfg.d_state, self.cfg.n_heads, self.cfg.head_dim
        z, xbc, dt = self._split(self.in_proj(u_BTC))
        x, B, C = F.silu(_causal_conv(self.conv1d, xbc)).split([di, N, N], dim=-1)
        dt = F.softplus(dt + self.dt_bias)
        # The chunked PyTorch SSD is what the FLOP count describes; tests flip `reference` to see it.
        fn = _pick_scan(self.cfg, self.reference, x)
        y, _ = fn(
            x.view(Bsz, T, H, P),
            dt,
            -torch.exp(self.A_log.float()),
            B,
            C,
            self.D.float(),
            chunk_size=self.cfg.chunk_size,
            final_state=False,
        )
        return self.out_proj(self.norm(y.reshape(Bsz, T, di) * F.silu(z)))

    def init_state(self, batch: int, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        return (
            torch.zeros(batch, self.conv_dim, c.d_conv - 1, device=device, dtype=dtype),
            torch.zeros(
                batch,
                c.n_heads,
                c.head_dim,
                c.d_state,
                device=device,
                dtype=torch.promote_types(dtype, torch.float32),
            ),
        )

    def step(self, u_BC: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        """One token: (B, d_model), (conv window, SSM state) -> (B, d_model), new state."""
        window, h = state
        di, N, H, P = self.cfg.d_inner, self.cfg.d_state, self.cfg.n_heads, self.cfg.head_dim
        z, xbc, dt = self._split(self.in_proj(u_BC))
        xbc, window = _conv_step(self.conv1d, window, xbc)
        x, B, C = F.silu(xbc).split([di, N, N], dim=-1)
        dt = F.softplus(dt + self.dt_bias)
        A = -torch.exp(self.A_log)
        f = h.dtype
        y, h = scan.ssd_step(h, x.view(-1, H, P).to(f), dt.to(f), A.to(f), B.to(f), C.to(f), self.D.to(f))
        y = y.reshape(-1, di).to(u_BC.dtype)
        return self.out_proj(self.norm(y * F.silu(z))), (window, h)


def build(cfg: MambaConfig) -> LM:
    mixer = MambaMixer if cfg.version == 1 else Mamba2Mixer
    model = LM(cfg, lambda i: Block(cfg.d_model, cfg.norm, mixer(cfg), None, cfg.bias))
    for m in model.modules():
        if isinstance(m, (MambaMixer, Mamba2Mixer)):
            m.reset_ssm_parameters()
    return model


def init_state(model: LM, batch: int, device=None, dtype=torch.float32) -> list:
    """Per-layer recurrent states for `step`."""
    return [b.seq_mixer.init_state(batch, device, dtype) for b in model.blocks]


@torch.no_grad()
def step(model: LM, idx_B: torch.Tensor, states: list) -> tuple[torch.Tensor, list]:
    """Generation: one token per sequence through the whole model in O(1) time and memory.
    Returns logits (B, V) equal to the parallel forward's at this position, and the new states."""
    x = model.tok_emb(idx_B)
    new = []
    for block, st in zip(model.blocks, states, strict=True):
        y, st = block.seq_mixer.step(block.norm1(x), st)
        x = x + y
        new.append(st)
    return model.head(model.norm_f(x)), new


def param_count(cfg: MambaConfig) -> dict[str, int]:
    d, di, N, K = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.d_conv
    b = 1 if cfg.bias else 0
    if cfg.version == 1:
        R = cfg.dt_rank
        per_layer = {
            "in_proj": d * 2 * di + b * 2 * di,
            "conv": di * K + (di if cfg.conv_bias else 0),
            "x_proj": di * (R + 2 * N),
            "dt_proj": R * di + di,
            "ssm": di * N + di,  # A_log, D
            "out_proj": di * d + b * d,
            "norms": norm_params(cfg.norm, d, cfg.bias),
        }
    else:
        H, cd = cfg.n_heads, di + 2 * N
        per_layer = {
            "in_proj": d * (2 * di + 2 * N + H) + b * (2 * di + 2 * N + H),
            "conv": cd * K + (cd if cfg.conv_bias else 0),
            "ssm": 3 * H,  # dt_bias, A_log, D
            "out_proj": di * d + b * d,
            "norms": norm_params(cfg.norm, d, cfg.bias) + di,  # block norm + gated RMSNorm
        }
    parts = {k: v * cfg.n_layers for k, v in per_layer.items()}
    parts.update(embedding_params(cfg))
    return parts


def flops_per_token(cfg: MambaConfig, seq_len: int, causal_half: bool = False) -> dict[str, int]:
    """Forward FLOPs per token by part; "ew_" parts are elementwise/scan work (see module docstring).
    `causal_half` does not apply: a scan has no attention matrix."""
    d, di, N, K, n = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.d_conv, cfg.n_layers
    if cfg.version == 1:
        R = cfg.dt_rank
        return {
            "in_proj": n * 2 * d * 2 * di,
            "conv": n * 2 * di * K,
            "x_proj": n * 2 * di * (R + 2 * N),
            "dt_proj": n * 2 * R * di,
            "out_proj": n * 2 * di * d,
            "ew_scan": n * 9 * di * N,
            "head": head_flops(cfg),
        }
    H, P = cfg.n_heads, cfg.head_dim
    L = min(cfg.chunk_size, seq_len)
    padded = -(-seq_len // L) * L
    # Per padded token: C B^T within the chunk (2LN, shared by heads) and the diagonal blocks
    # (2LHP); per token of all chunks but one: chunk-final states (2HPN) and reading the carried
    # states (2HPN). See harness.ops.scan.ssd_scan.
    ssd = ((2 * L * N + 2 * L * H * P) * padded + 4 * H * P * N * (padded - L)) / seq_len
    return {
        "in_proj": n * 2 * d * (2 * di + 2 * N + H),
        "conv": n * 2 * (di + 2 * N) * K,
        "ssd": round(n * ssd),
        "out_proj": n * 2 * di * d,
        "ew_ssd": round(n * (3 * L * H + 3 * H * P + 2 * H * P * N / L) * padded / seq_len),
        "head": head_flops(cfg),
    }
