"""Analytic FLOP count of HMUTransformer at one shape, for efficiency figures in `bench`.

Counts matrix-multiply FLOPs only (2 per multiply-add), the way ``torch.utils.flop_counter``
and roofline analyses do: projections, attention scores and weighted sums, FFNs, the HMU's
Linear layers and the LM head. Attention is counted dense (all Ls x Ls / Lt x Lt / Lt x Ls
scores) because every backend here computes it dense; causal and padding masks only change
which scores are discarded. Elementwise work (LayerNorm, softmax, GELU, adds) is < 2% here
and left out, so achieved FLOP/s is a slight underestimate.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..core.config import ModelConfig


@dataclass(frozen=True)
class FlopBreakdown:
    encoder: int
    hmu: int
    decoder: int
    lm_head: int

    @property
    def total(self) -> int:
        return self.encoder + self.hmu + self.decoder + self.lm_head

    def to_dict(self) -> dict[str, int]:
        return {"encoder": self.encoder, "hmu": self.hmu, "decoder": self.decoder,
                "lm_head": self.lm_head, "total": self.total}


def model_flops(cfg: ModelConfig, batch: int, src_len: int, tgt_len: int) -> FlopBreakdown:
    """Matmul FLOPs of one forward pass at (B, Ls, Lt)."""
    d, f, lat, v = cfg.d_model, cfg.d_ff, cfg.latent_dim, cfg.vocab_size
    ts, tt = batch * src_len, batch * tgt_len  # source / target tokens

    def mm(m: int, k: int, n: int) -> int:
        return 2 * m * k * n

    enc_layer = (mm(ts, d, 3 * d)                      # packed Q, K, V projection
                 + 2 * batch * mm(src_len, d, src_len)  # scores and weighted sum (all heads)
                 + mm(ts, d, d)                        # output projection
                 + mm(ts, d, f) + mm(ts, f, d))        # feed-forward
    hmu = 0
    if cfg.use_hmu:
        hmu = (2 * mm(ts, d, lat)       # VAE mu and logvar heads
               + mm(ts, lat, d)         # VAE decoder
               + mm(ts, 2 * d, d)       # gate MLP on [v_norm, v_latent_norm]
               + mm(ts, d, d))          # fusion projection
    dec_layer = (mm(tt, d, 3 * d) + 2 * batch * mm(tgt_len, d, tgt_len) + mm(tt, d, d)  # self
                 + mm(tt, d, d) + mm(ts, d, 2 * d)                                      # cross q, kv
                 + 2 * batch * mm(tgt_len, d, src_len) + mm(tt, d, d)                   # cross attn
                 + mm(tt, d, f) + mm(tt, f, d))                                         # FFN
    return FlopBreakdown(encoder=cfg.n_encoder_layers * enc_layer, hmu=hmu,
                         decoder=cfg.n_decoder_layers * dec_layer, lm_head=mm(tt, d, v))


def onnx_matmul_flops(path: str, feeds: dict) -> int:  # type: ignore[type-arg]
    """Independent count: run the graph once with every MatMul/Gemm operand exposed as an output
    and sum 2*M*K*N over the real operand shapes (for checking ``model_flops``, not for speed)."""
    return matmul_flop_counter(path)(feeds)


def matmul_flop_counter(path: str) -> Callable[[dict], int]:  # type: ignore[type-arg]
    """``onnx_matmul_flops`` for many feeds of one graph: the graph is loaded and its session
    made once (the graph's inputs are the feeds' names, whatever their shapes)."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(path))
    mm = [n for n in proto.graph.node if n.op_type in ("MatMul", "Gemm")]
    inits = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    inputs = {i.name for i in proto.graph.input}
    have = {o.name for o in proto.graph.output}
    wanted = sorted({i for n in mm for i in n.input[:2] if i not in inits and i not in inputs})
    for name in wanted:
        if name not in have:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])

    def count(feeds: dict) -> int:  # type: ignore[type-arg]
        shapes = {k: tuple(v.shape) for k, v in zip(wanted, sess.run(wanted, feeds))}
        shapes.update(inits)
        shapes.update({k: tuple(v.shape) for k, v in feeds.items()})
        total = 0
        for n in mm:
            a, b = shapes[n.input[0]], shapes[n.input[1]]
            attrs = {x.name: x.i for x in n.attribute}
            if n.op_type == "Gemm":
                m, k = (a[::-1] if attrs.get("transA") else a)
                n_out = b[0] if attrs.get("transB") else b[1]
                total += 2 * m * k * n_out
            else:
                batch = int(np.prod(np.broadcast_shapes(a[:-2], b[:-2])))
                m = a[-2] if len(a) >= 2 else 1
                total += 2 * batch * m * a[-1] * b[-1]
        return total
    return count
