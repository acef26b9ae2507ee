"""``tf.train.Example`` message classes without importing TensorFlow.

The wire format is TensorFlow's (tensorflow/core/example/{example,feature}.proto);
the classes are built from a descriptor in a private pool, so Beam workers
serialize and parse records without loading TensorFlow (3.6 s and ~0.5 GB
per process), and nothing clashes with TensorFlow's own classes when both
are loaded.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_PACKAGE = "xray_pipelines.tfexample"


def _build() -> dict[str, Any]:
    proto = descriptor_pb2.FileDescriptorProto(
        name="xray_pipelines/tf_example.proto", package=_PACKAGE, syntax="proto3"
    )
    label_repeated = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
    label_optional = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
    types = descriptor_pb2.FieldDescriptorProto

    def message(name: str) -> descriptor_pb2.DescriptorProto:
        return proto.message_type.add(name=name)

    def field(owner, name, number, kind, label=label_optional, type_name=None, oneof=None):
        added = owner.field.add(name=name, number=number, type=kind, label=label)
        if type_name:
            added.type_name = f".{_PACKAGE}.{type_name}"
        if oneof is not None:
            added.oneof_index = oneof
        return added

    packed = message("Int64List")
    field(packed, "value", 1, types.TYPE_INT64, label_repeated).options.packed = True
    floats = message("FloatList")
    field(floats, "value", 1, types.TYPE_FLOAT, label_repeated).options.packed = True
    field(message("BytesList"), "value", 1, types.TYPE_BYTES, label_repeated)
    feature = message("Feature")
    feature.oneof_decl.add(name="kind")
    field(feature, "bytes_list", 1, types.TYPE_MESSAGE, type_name="BytesList", oneof=0)
    field(feature, "float_list", 2, types.TYPE_MESSAGE, type_name="FloatList", oneof=0)
    field(feature, "int64_list", 3, types.TYPE_MESSAGE, type_name="Int64List", oneof=0)
    features = message("Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    field(entry, "key", 1, types.TYPE_STRING)
    field(entry, "value", 2, types.TYPE_MESSAGE, type_name="Feature")
    field(features, "feature", 1, types.TYPE_MESSAGE, label_repeated, "Features.FeatureEntry")
    field(message("Example"), "features", 1, types.TYPE_MESSAGE, type_name="Features")

    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}"))
        for name in ("Example", "Features", "Feature", "BytesList", "Int64List", "FloatList")
    }


_CLASSES = _build()
Example = _CLASSES["Example"]
Features = _CLASSES["Features"]
Feature = _CLASSES["Feature"]
BytesList = _CLASSES["BytesList"]
Int64List = _CLASSES["Int64List"]
FloatList = _CLASSES["FloatList"]
