"""Arrow column types that a Delta table cannot hold as they are, kept exact across the hub.

Delta Lake's type system has no fixed-size lists and no unsigned integers, so a robot's
`FLOAT[7]` joint vector or a `UTINYINT[64][64][3]` camera frame would come back as variable
lists of signed bytes (and a pixel value of 200 does not even fit in Delta's signed `byte`:
delta-rs refuses the write). Three rules keep such columns exact:

1. `storable_schema` widens unsigned integers to the next signed width (uint8 -> int16, ...,
   uint64 -> int64 with a checked cast) and float16 to float32, so every value fits;
2. it records the column's original Arrow type in the Delta field's metadata
   (`arf.arrow_type`: the type serialized as an Arrow IPC schema, base64), which the Delta log
   keeps with the table schema, version by version;
3. `logical_schema` reads that metadata back, and `arf_trainer.datahub.tables.open_table`
   scans the table with it, so DuckDB sees `FLOAT[7]` and `UTINYINT[64][64][3]` again (Arrow
   casts the stored int16 back to uint8 as it reads; the values are in range by construction).

Columns without the metadata (tables written before, or by other engines) read as Delta types.
"""

from __future__ import annotations

import base64

import pyarrow as pa

ARROW_TYPE_KEY = "arf.arrow_type"

_WIDER = {pa.uint8(): pa.int16(), pa.uint16(): pa.int32(), pa.uint32(): pa.int64(),
          pa.uint64(): pa.int64(), pa.float16(): pa.float32()}


def encode_type(dtype: pa.DataType) -> str:
    """`dtype` as text that survives a JSON log: a one-field Arrow IPC schema, base64."""
    return base64.b64encode(pa.schema([pa.field("t", dtype)]).serialize().to_pybytes()).decode()


def decode_type(text: str) -> pa.DataType:
    """The Arrow type `encode_type` wrote."""
    buffer = pa.py_buffer(base64.b64decode(text.encode()))
    return pa.ipc.read_schema(buffer).field("t").type


def _canonical(dtype: pa.DataType) -> pa.DataType:
    """`dtype` with list children named 'item': Parquet readers name them 'element', and the
    recorded type must not differ between two files of the same columns."""
    if pa.types.is_fixed_size_list(dtype):
        return pa.list_(_canonical(dtype.value_type), dtype.list_size)
    if pa.types.is_list(dtype):
        return pa.list_(_canonical(dtype.value_type))
    if pa.types.is_large_list(dtype):
        return pa.large_list(_canonical(dtype.value_type))
    if pa.types.is_struct(dtype):
        return pa.struct([field.with_type(_canonical(field.type)) for field in dtype])
    return dtype


def _storable(dtype: pa.DataType) -> pa.DataType:
    """`dtype` with every part Delta cannot represent widened (nested lists included)."""
    if dtype in _WIDER:
        return _WIDER[dtype]
    if pa.types.is_fixed_size_list(dtype):
        return pa.list_(_storable(dtype.value_type), dtype.list_size)
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        return pa.list_(_storable(dtype.value_type))
    if pa.types.is_struct(dtype):
        return pa.struct([field.with_type(_storable(field.type)) for field in dtype])
    return dtype


def needs_record(dtype: pa.DataType) -> bool:
    """True when Delta would not give `dtype` back as it is (so its type must be recorded)."""
    if dtype in _WIDER or pa.types.is_fixed_size_list(dtype):
        return True
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        return needs_record(dtype.value_type)
    if pa.types.is_struct(dtype):
        return any(needs_record(field.type) for field in dtype)
    return False


def storable_schema(schema: pa.Schema) -> pa.Schema:
    """The schema to write to Delta: widened types, original types recorded in field metadata.

    Other field and schema metadata is dropped (pandas' index metadata has no meaning in the hub).
    """
    fields = []
    for field in schema:
        if needs_record(field.type):
            fields.append(pa.field(field.name, _storable(field.type), nullable=True,
                                   metadata={ARROW_TYPE_KEY: encode_type(_canonical(field.type))}))
        else:
            fields.append(pa.field(field.name, field.type, nullable=True))
    return pa.schema(fields)


def to_storable(batch: pa.RecordBatch, storable: pa.Schema) -> pa.RecordBatch:
    """`batch` (columns in any order) in the order and types of `storable`.

    Every cast is checked: a uint64 above the int64 range fails here with Arrow's message.
    """
    columns = [batch.column(field.name) for field in storable]
    arrays = [column if column.type == field.type else column.cast(field.type)
              for column, field in zip(columns, storable)]
    return pa.RecordBatch.from_arrays(arrays, schema=storable)


def recorded_types(delta_schema) -> dict[str, pa.DataType]:
    """{column: original Arrow type} recorded in `DeltaTable.schema()`'s field metadata."""
    return {field.name: decode_type(field.metadata[ARROW_TYPE_KEY])
            for field in delta_schema.fields
            if field.metadata and field.metadata.get(ARROW_TYPE_KEY)}


def logical_schema(stored: pa.Schema, recorded: dict[str, pa.DataType]) -> pa.Schema:
    """`stored` (the Arrow schema delta-rs reads the table with) with `recorded` types put back."""
    return pa.schema([field.with_type(recorded[field.name]) if field.name in recorded else field
                      for field in stored])


def _normal(dtype: pa.DataType) -> str:
    """A type's identity as the hub stores it: large/view variants and time units do not clash."""
    if pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype):
        return "string"
    if pa.types.is_large_binary(dtype) or pa.types.is_binary_view(dtype):
        return "binary"
    if pa.types.is_large_list(dtype) or pa.types.is_list(dtype):
        return f"list<{_normal(dtype.value_type)}>"
    if pa.types.is_fixed_size_list(dtype):
        return f"{_normal(dtype.value_type)}[{dtype.list_size}]"
    if pa.types.is_timestamp(dtype):
        return f"timestamp[{dtype.tz or ''}]"  # Delta keeps microseconds whatever the unit
    return str(dtype)


def schema_differences(table: pa.Schema, incoming: pa.Schema) -> list[str]:
    """Human-readable differences between a table's columns and an append's, [] if none."""
    have = {field.name: field.type for field in table}
    new = {field.name: field.type for field in incoming}
    problems = [f"missing column {name!r} ({have[name]})" for name in have if name not in new]
    problems += [f"extra column {name!r} ({new[name]})" for name in new if name not in have]
    problems += [f"column {name!r} is {new[name]} in the input but {have[name]} in the table"
                 for name in have if name in new and _normal(have[name]) != _normal(new[name])]
    return problems


def type_name(dtype: pa.DataType) -> str:
    """A short, DuckDB-like spelling for listings: float[7], uint8[64][64][3], list<double>."""
    dims = []
    while pa.types.is_fixed_size_list(dtype):
        dims.append(dtype.list_size)
        dtype = dtype.value_type
    base = str(dtype).replace("<item: ", "<").replace("<element: ", "<")
    return base + "".join(f"[{size}]" for size in dims)


def unsliced(array: pa.Array) -> pa.Array:
    """`array` with no slice offset at any fixed-size-list level (the same values).

    pyarrow 25's `take` and `filter` read a *sliced* fixed-size list of fixed-size lists (a
    `FLOAT[4][3]` or an image `UTINYINT[H][W][C]`) from the wrong place: garbage values, no
    error (`Array.slice(8).take([0, 1])` on a 3-level frame column; one level is read right).
    Rebuilding each level over its child values cut at the offset costs no copy (`.values`
    ignores the offset; `flatten()` would also drop the values under null slots)."""
    if not pa.types.is_fixed_size_list(array.type):
        return array
    size = array.type.list_size
    values = array.values.slice(array.offset * size, len(array) * size)
    mask = array.is_null() if array.null_count else None
    return pa.FixedSizeListArray.from_arrays(unsliced(values), type=array.type, mask=mask)


def unsliced_table(table: pa.Table) -> pa.Table:
    """`unsliced` applied to every chunk of every column of `table`."""
    columns = [pa.chunked_array([unsliced(chunk) for chunk in column.chunks], type=column.type)
               for column in table.columns]
    return pa.Table.from_arrays(columns, schema=table.schema)


def unsliced_batch(batch: pa.RecordBatch) -> pa.RecordBatch:
    """`unsliced` applied to every column of `batch`."""
    return pa.RecordBatch.from_arrays([unsliced(c) for c in batch.columns], schema=batch.schema)
