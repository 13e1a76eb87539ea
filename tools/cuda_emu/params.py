"""ctypes mirrors of the plain parameter structs in a C++ header (nk::SsdParams, SsdBwdParams),
parsed from the header itself so a field added there needs no edit here, plus a generated
offsetof table the emulator library exports, so the test can prove both layouts agree.

Understands member lines of the form `TYPE name[, name...];` with TYPE one of the scalar,
pointer, enum and nested-struct types below (comments ignored).
"""
import ctypes
import re

_SCALARS = {
    "int64_t": ctypes.c_int64,
    "int32_t": ctypes.c_int32,
    "uint64_t": ctypes.c_uint64,
    "uint32_t": ctypes.c_uint32,
    "int": ctypes.c_int,
    "bool": ctypes.c_bool,
    "float": ctypes.c_float,
    "double": ctypes.c_double,
    "DType": ctypes.c_int,  # enum class DType : int
}


def parse_structs(header_text, names):
    text = re.sub(r"//[^\n]*", "", header_text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    out = {}
    for name in names:
        m = re.search(r"struct\s+" + name + r"\s*\{(.*?)\};", text, re.S)
        if not m:
            raise ValueError(f"struct {name} not found")
        fields = []
        for decl in m.group(1).split(";"):
            decl = " ".join(decl.split())
            if not decl:
                continue
            mm = re.match(r"^((?:const\s+)?[\w:]+\s*\**)\s*(.*)$", decl)
            if not mm:
                raise ValueError(f"{name}: cannot parse member {decl!r}")
            ty, rest = mm.group(1).replace(" ", ""), mm.group(2)
            if rest.startswith("*"):
                ty += "*" * (len(rest) - len(rest.lstrip("*")))
                rest = rest.lstrip("*")
            for n in [r.strip() for r in rest.split(",")]:
                fields.append((n, ty))
        out[name] = fields
    return out


def _ctype(ty, structs):
    base = ty.replace("const", "")
    if base.endswith("*"):
        return ctypes.c_void_p
    if base in _SCALARS:
        return _SCALARS[base]
    if base in structs:
        return structs[base]
    raise ValueError(f"member type {ty!r} not understood")


def ctypes_structs(header_text, names=("SsdParams", "SsdBwdParams")):
    parsed = parse_structs(header_text, names)
    made = {}
    for name in names:
        made[name] = type(name, (ctypes.Structure,), {"_fields_": [(n, _ctype(t, made)) for n, t in parsed[name]]})
    return made, parsed


def layout_table_cpp(header_text, names=("SsdParams", "SsdBwdParams"), ns="nk"):
    """C++ source: emu_params_offset(struct, field) and emu_params_sizeof(struct)."""
    parsed = parse_structs(header_text, names)
    lines = ["#include <cstddef>", "#include <cstring>", "namespace {", "struct EmuField { const char* s; const char* f; long long off; };",
             "const EmuField kEmuFields[] = {"]
    for name in names:
        for n, _ in parsed[name]:
            lines.append(f'  {{"{name}", "{n}", (long long)offsetof({ns}::{name}, {n})}},')
    lines.append("};")
    lines.append("}  // namespace")
    lines.append('EMU_EXPORT long long emu_params_offset(const char* s, const char* f) {')
    lines.append("  for (const auto& e : kEmuFields) if (!std::strcmp(e.s, s) && !std::strcmp(e.f, f)) return e.off;")
    lines.append("  return -1;")
    lines.append("}")
    lines.append('EMU_EXPORT long long emu_params_sizeof(const char* s) {')
    for name in names:
        lines.append(f'  if (!std::strcmp(s, "{name}")) return (long long)sizeof({ns}::{name});')
    lines.append("  return -1;")
    lines.append("}")
    return "\n".join(lines) + "\n"
