"""Codecs, their spec strings, error feedback and the payload wire format.

>>> codec = parse("topk:k=64,tile=4096+q2")
>>> payload = codec.encode(tensor)            # doctest: +SKIP
>>> frames = payload.to_frames()              # doctest: +SKIP
>>> restored = codec.decode(Payload.from_frames(frames))  # doctest: +SKIP

See :mod:`lowband.compress._quant` for the quantization grids and their error
bounds, :mod:`lowband.compress._payload` for the byte layout.
"""

from lowband.compress._cast import Cast
from lowband.compress._codec import Codec, parse
from lowband.compress._dct import DCT, TileLayout, dct2
from lowband.compress._feedback import ErrorFeedback, encode_with_feedback
from lowband.compress._payload import MAX_PAYLOAD_BYTES, Payload
from lowband.compress._quant import BlockQuant, Sign
from lowband.compress._topk import TopK

__all__ = [
    "BlockQuant",
    "Cast",
    "Codec",
    "DCT",
    "ErrorFeedback",
    "MAX_PAYLOAD_BYTES",
    "Payload",
    "Sign",
    "TileLayout",
    "TopK",
    "dct2",
    "decode",
    "encode_with_feedback",
    "parse",
]


def decode(payload: Payload) -> "torch.Tensor":  # noqa: F821
    """Decode a payload with the codec its header names."""
    return parse(payload.spec).decode(payload)
