"""The AmNets RNN-T model built on amnets_kernels.

Amortized Neural Networks: Macoskey, Strimel, Su, Rastrow, "Amortized Neural Networks for Low-Latency
Speech Recognition", Interspeech 2021. An RNN-T whose LSTM encoder picks, frame by frame, a full
branch or a cheap one (block-sparse or low-rank), chosen by a small arbitrator network.

  AmNetsEncoder   the switching encoder: forward() to train, stream() / streamer() for inference on the
                  native frame engine (one call per chunk of frames)
  Streamer        what AmNetsEncoder.streamer() returns: a live stream, its state carried from call to call
  AmNetsRNNT      frame stacking + encoder + prediction network + fused joint RNN-T loss
  simulate_latency  user-perceived latency, real-time factor and backlog from per-frame costs
  amnets.data     espeak-ng corpus, LibriSpeech reader, character tokenizer, log-mel, dataset + collate
  amnets.cli      `amnets corpus|train|eval|demo` (python -m amnets): corpus, training (DDP under torchrun), WER/CER, demo

Choices the paper leaves open, each a knob (default in brackets):
  * Sparse branch: the same weights under a block mask (no extra parameters) [sparse]; the mask
    prunes each layer's concatenated [W_ih | W_hh] by block Frobenius norm at `sparsity` [0.8] with
    `block_size` [32] blocks, fixed at init; `reprune()` recomputes it (say, after pretraining). A mask
    that keeps no block of a layer (the branch would be the bias alone), or every block, is a
    NotCheaperWarning; `amnets train` refuses it.
  * Low-rank branch: its own factors for W_ih and W_hh, truncated-SVD initialised at `rank` [128]
    (clipped to each matrix), trained jointly; the bias is shared with the full branch. A rank at which
    a layer's branch costs no fewer MACs than its full one is a NotCheaperWarning (`amnets train` refuses it).
  * Arbitrator: Linear(`arbitrator_hidden` [32]) -> ReLU -> Linear on the current (stacked) frame,
    plus the previous top-layer h with `arbitrator_uses_state` [False]; one decision per frame for all
    layers, or per layer with `per_layer_decisions` [False]; output bias logit(`init_p_full`) [0.5].
  * Training: straight-through Gumbel-sigmoid, temperature `tau` [1.0] (anneal it from outside),
    hard decision = sample > 0.5; both branches are computed every step. Eval and streaming decide
    p_full > `threshold` [0.5].
  * Cost: expected MACs per frame = arbitrator + sum over layers of p_full * full + (1 - p_full) *
    cheap, with the soft p_full (not the sample) so the penalty has a gradient; gate products and the
    arbitrator are counted, biases and pointwise ops are not; a sparse branch counts its kept weights
    (edge blocks clipped to the matrix). cost_fraction = expected / all-full MACs over valid frames.
  * Loss: RNN-T loss (mean over utterances) + cost_weight * cost_fraction, or with a `budget`
    cost_weight * relu(cost_fraction - budget).
  * Front end: `stack` [3] frames with stride 3; a last partial group is zero-padded or dropped
    (`stack_tail` ["pad"]). Prediction network: embedding (blank 0 is the start symbol) + one LSTM
    layer; joint: act(enc_proj(enc) + pred_proj(pred)) -> vocab, `joint_activation` ["tanh"].
  * Empty transcripts are rejected by AmNetsRNNT.loss; padded frames produce zero encoder output and
    are left out of every statistic.
  * Dense baseline: the same encoder with `force="full"` (no arbitrator, no cheap branch run).
"""

__version__ = "0.1.0"

from .encoder import AmNetsEncoder, Streamer, lstm_pointwise  # noqa: E402
from .latency import simulate_latency  # noqa: E402
from .model import AmNetsRNNT, stack_frames  # noqa: E402

__all__ = ["AmNetsEncoder", "AmNetsRNNT", "Streamer", "lstm_pointwise", "simulate_latency", "stack_frames"]
