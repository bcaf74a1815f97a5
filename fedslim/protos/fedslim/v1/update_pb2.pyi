from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Lossless(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOSSLESS_NONE: _ClassVar[Lossless]
    LOSSLESS_ZLIB: _ClassVar[Lossless]
    LOSSLESS_LZMA: _ClassVar[Lossless]
    LOSSLESS_ZSTD: _ClassVar[Lossless]

class FloatType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FLOAT_TYPE_FLOAT32: _ClassVar[FloatType]
    FLOAT_TYPE_FLOAT16: _ClassVar[FloatType]
    FLOAT_TYPE_BFLOAT16: _ClassVar[FloatType]
LOSSLESS_NONE: Lossless
LOSSLESS_ZLIB: Lossless
LOSSLESS_LZMA: Lossless
LOSSLESS_ZSTD: Lossless
FLOAT_TYPE_FLOAT32: FloatType
FLOAT_TYPE_FLOAT16: FloatType
FLOAT_TYPE_BFLOAT16: FloatType

class Envelope(_message.Message):
    __slots__ = ("lossless", "raw_size", "payload", "crc32")
    LOSSLESS_FIELD_NUMBER: _ClassVar[int]
    RAW_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    lossless: Lossless
    raw_size: int
    payload: bytes
    crc32: int
    def __init__(self, lossless: _Optional[_Union[Lossless, str]] = ..., raw_size: _Optional[int] = ..., payload: _Optional[bytes] = ..., crc32: _Optional[int] = ...) -> None: ...

class Sync(_message.Message):
    __slots__ = ("steps",)
    STEPS_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, steps: _Optional[_Iterable[bytes]] = ...) -> None: ...

class Merge(_message.Message):
    __slots__ = ("parent", "round", "version", "state", "merged", "origin", "steps")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MERGED_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    parent: str
    round: int
    version: int
    state: bytes
    merged: str
    origin: int
    steps: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, parent: _Optional[str] = ..., round: _Optional[int] = ..., version: _Optional[int] = ..., state: _Optional[bytes] = ..., merged: _Optional[str] = ..., origin: _Optional[int] = ..., steps: _Optional[_Iterable[bytes]] = ...) -> None: ...

class Chain(_message.Message):
    __slots__ = ("merges",)
    MERGES_FIELD_NUMBER: _ClassVar[int]
    merges: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, merges: _Optional[_Iterable[bytes]] = ...) -> None: ...

class FastUpdate(_message.Message):
    __slots__ = ("kind", "base_fingerprint", "state_version", "tensors")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_DELTA: _ClassVar[FastUpdate.Kind]
        KIND_STATE: _ClassVar[FastUpdate.Kind]
    KIND_DELTA: FastUpdate.Kind
    KIND_STATE: FastUpdate.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    BASE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    STATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    kind: FastUpdate.Kind
    base_fingerprint: str
    state_version: int
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, kind: _Optional[_Union[FastUpdate.Kind, str]] = ..., base_fingerprint: _Optional[str] = ..., state_version: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("name", "shape", "dense", "sparse", "low_rank")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    LOW_RANK_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dense: Values
    sparse: Sparse
    low_rank: LowRank
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dense: _Optional[_Union[Values, _Mapping]] = ..., sparse: _Optional[_Union[Sparse, _Mapping]] = ..., low_rank: _Optional[_Union[LowRank, _Mapping]] = ...) -> None: ...

class Values(_message.Message):
    __slots__ = ("count", "floats", "quantized")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    FLOATS_FIELD_NUMBER: _ClassVar[int]
    QUANTIZED_FIELD_NUMBER: _ClassVar[int]
    count: int
    floats: Floats
    quantized: Quantized
    def __init__(self, count: _Optional[int] = ..., floats: _Optional[_Union[Floats, _Mapping]] = ..., quantized: _Optional[_Union[Quantized, _Mapping]] = ...) -> None: ...

class Floats(_message.Message):
    __slots__ = ("type", "data")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    type: FloatType
    data: bytes
    def __init__(self, type: _Optional[_Union[FloatType, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Quantized(_message.Message):
    __slots__ = ("bits", "offset", "scale", "codes")
    BITS_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    CODES_FIELD_NUMBER: _ClassVar[int]
    bits: int
    offset: float
    scale: float
    codes: bytes
    def __init__(self, bits: _Optional[int] = ..., offset: _Optional[float] = ..., scale: _Optional[float] = ..., codes: _Optional[bytes] = ...) -> None: ...

class Sparse(_message.Message):
    __slots__ = ("nnz", "gaps_varint", "bitmask", "random_seed", "values")
    NNZ_FIELD_NUMBER: _ClassVar[int]
    GAPS_VARINT_FIELD_NUMBER: _ClassVar[int]
    BITMASK_FIELD_NUMBER: _ClassVar[int]
    RANDOM_SEED_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    nnz: int
    gaps_varint: bytes
    bitmask: bytes
    random_seed: int
    values: Values
    def __init__(self, nnz: _Optional[int] = ..., gaps_varint: _Optional[bytes] = ..., bitmask: _Optional[bytes] = ..., random_seed: _Optional[int] = ..., values: _Optional[_Union[Values, _Mapping]] = ...) -> None: ...

class LowRank(_message.Message):
    __slots__ = ("rank", "left", "right")
    RANK_FIELD_NUMBER: _ClassVar[int]
    LEFT_FIELD_NUMBER: _ClassVar[int]
    RIGHT_FIELD_NUMBER: _ClassVar[int]
    rank: int
    left: Values
    right: Values
    def __init__(self, rank: _Optional[int] = ..., left: _Optional[_Union[Values, _Mapping]] = ..., right: _Optional[_Union[Values, _Mapping]] = ...) -> None: ...
