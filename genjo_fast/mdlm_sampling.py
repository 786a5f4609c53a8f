"""The masked-LM family's sampling op: a full-vocabulary categorical sample per row and its
probability, on the rows that can change only.

:func:`sample_rows` takes the logits lazily, a chunk of rows at a time (``chunk(a, b)``), so
that the LM head itself can run chunk by chunk: one pass per chunk computes the head, the
sample and its probability, and no ``(R, V)`` tensor larger than a chunk ever exists. Its
arithmetic is that of the plain statement (:func:`genjo_fast.reference_mdlm.sample_tokens`),
done in place on the chunk: for the same logits and draws the tokens and probabilities are
bitwise the statement's.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from .sampling import top_p_removed

# Logits per chunk (2 MiB of float32; the float64 draws of a chunk are twice that). Larger
# chunks read the LM head's weight fewer times but raise the peak memory (on CPU, glibc keeps
# freed blocks of this size resident).
_CHUNK_ELEMENTS = 2**19


def sample_rows(chunk: Callable[[int, int], torch.Tensor], num_rows: int, vocab: int,
                uniform: Callable[[int, int], torch.Tensor], *, mask_id: int,
                temperature: float, top_p: Optional[float] = None,
                probe_id: Optional[int] = None, chunk_elements: int = _CHUNK_ELEMENTS
                ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Samples a token per row from ``softmax`` of its logits (the mask token excluded) and
    reads its probability.

    Per row: the mask token's logit becomes the dtype's minimum; the logits are divided by
    ``temperature`` (unless it is 0 or 1); with ``top_p < 1`` the ids the nucleus filter
    removes (:func:`genjo_fast.sampling.top_p_removed`) get the dtype's minimum too;
    ``probs = softmax`` in the logits' dtype; the token is ``argmax(logits - log(-log(u)))``
    in float64 with ``u`` one uniform per logit (the Gumbel-max trick: a sample of ``probs``),
    or ``argmax(logits)`` at temperature 0.

    Args:
        chunk: ``chunk(a, b)`` -> float ``(b - a, vocab)``, the logits of rows ``a:b``, a
            tensor this op may overwrite (e.g. fresh output of the LM head).
        num_rows: ``R``, the rows to sample.
        uniform: ``uniform(a, b)`` -> float64 ``U(0, 1)`` ``(b - a, vocab)``, overwritten too;
            not called at temperature 0.
        mask_id: the mask token, never sampled.
        top_p: the nucleus filter's mass (``None`` or ``>= 1``: off).
        probe_id: also return every row's probability of this token (e.g. EOS).
        chunk_elements: rows are processed ``max(1, chunk_elements // vocab)`` at a time.
    Returns:
        ``x0`` int64 ``(R,)``, its probability ``(R,)`` in the logits' dtype (float32 when
        ``R == 0``), and the probe's probabilities ``(R,)`` or ``None``.
    """
    rows_per_chunk = max(1, chunk_elements // vocab)
    x0 = p = probe = None
    for a in range(0, num_rows, rows_per_chunk):
        b = min(a + rows_per_chunk, num_rows)
        logits = chunk(a, b)
        logits[:, mask_id] = torch.finfo(logits.dtype).min
        if temperature not in (0, 1):
            logits.div_(temperature)
        if top_p is not None and top_p < 1:
            logits.masked_fill_(top_p_removed(logits, top_p), torch.finfo(logits.dtype).min)
        if x0 is None:
            x0 = torch.empty(num_rows, dtype=torch.long, device=logits.device)
            p = torch.empty(num_rows, dtype=logits.dtype, device=logits.device)
            if probe_id is not None:
                probe = torch.empty(num_rows, dtype=logits.dtype, device=logits.device)
        if temperature == 0:
            tokens = torch.argmax(logits, dim=-1)
        else:
            # logits - log(-log(u)), in place in the draws' float64 buffer.
            noised = uniform(a, b).log_().neg_().log_().neg_().add_(logits)
            tokens = torch.argmax(noised, dim=-1)
            del noised
        probs = F.softmax(logits, dim=-1)
        del logits
        x0[a:b] = tokens
        p[a:b] = torch.gather(probs, -1, tokens[:, None]).squeeze(-1)
        if probe is not None:
            probe[a:b] = probs[:, probe_id]
    if x0 is None:  # no rows: nothing was computed
        x0 = torch.empty(0, dtype=torch.long)
        p = torch.empty(0)
        probe = torch.empty(0) if probe_id is not None else None
    return x0, p, probe
