"""Our wire formats' message classes, built at import from the descriptors that setup.py
compiles from protos/*.proto (each NAME_pb2 module holds one serialized
FileDescriptorProto and calls build()).

Why not protoc's Python output: it checks that the protobuf runtime is at least the
version that generated it (gencode 7 refuses runtime 6, which tritonclient pins), and
registers its types in protobuf's default pool, where eas-prediction's tf_request.proto
already defines ArrayShape and friends without a package (a conflict that fails the
import). Here the types live in a pool of our own, and what builds them is protobuf's
public message factory, which every runtime from 3.20 (eas-prediction's) to 7 has.
"""
from google.protobuf import descriptor_pool
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

try:
    from google.protobuf.message_factory import GetMessageClass
except ImportError:  # protobuf before 4.21
    from google.protobuf.message_factory import MessageFactory

    GetMessageClass = MessageFactory().GetPrototype

POOL = descriptor_pool.DescriptorPool()


def _message_class(message):
    """A message type's class, its nested types as attributes (as in protoc's modules;
    protobuf 3.20's factory leaves them out)."""
    cls = GetMessageClass(message)
    for nested in message.nested_types:
        setattr(cls, nested.name, _message_class(nested))
    for enum in message.enum_types:
        setattr(cls, enum.name, EnumTypeWrapper(enum))
    return cls


def build(module_globals: dict, serialized: bytes) -> None:
    """Fill a NAME_pb2 module's namespace as protoc's would: DESCRIPTOR, a class per
    message, a wrapper per enum and its values as constants."""
    file = POOL.AddSerializedFile(serialized)
    module_globals["DESCRIPTOR"] = file
    for name, message in file.message_types_by_name.items():
        module_globals[name] = _message_class(message)
    for name, enum in file.enum_types_by_name.items():
        module_globals[name] = EnumTypeWrapper(enum)
        for value in enum.values:
            module_globals[value.name] = value.number
