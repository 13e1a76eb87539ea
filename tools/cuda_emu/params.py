"""ctypes mirrors of the plain parameter structs in a C++ header (nk::SsdParams, SsdBwdParams),
parsed from the header itself so a field added there needs no edit here, plus a generated
offsetof table the emulator library exports, so the test can prove both layouts agree.

Understands member lines of the form `TYPE name[, name[N]...] [= init];` with TYPE one of the
scalar and pointer types below, an enum declared in the header, or a struct parsed before it
(comments and default initializers ignored).
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


def _code(header_text):
    text = re.sub(r"//[^\n]*", "", header_text)
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def enum_types(header_text):
    """{name: ctypes type} of the enums the header declares (`enum [class] Name [: int]`)."""
    return {m.group(1): _SCALARS.get(m.group(2) or "int", ctypes.c_int)
            for m in re.finditer(r"\benum\s+(?:class\s+)?(\w+)\s*(?::\s*(\w+))?\s*\{", _code(header_text))}


def parse_structs(header_text, names):
    """{struct: [(member, type)]}; an array member's type ends in [N]."""
    text = _code(header_text)
    out = {}
    for name in names:
        m = re.search(r"struct\s+" + name + r"\s*\{", text)
        if not m:
            raise ValueError(f"struct {name} not found")
        depth, end = 1, m.end()
        while depth:  # to the matching brace (initializers have braces too)
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            end += 1
        fields = []
        for decl in text[m.end():end - 1].split(";"):
            decl = re.sub(r"\s*=\s*(\{[^}]*\}|[^,]+)", "", " ".join(decl.split()))  # default initializers
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
                arr = re.fullmatch(r"(\w+)\s*\[\s*(\d+)\s*\]", n)
                fields.append((arr.group(1), f"{ty}[{arr.group(2)}]") if arr else (n, ty))
        out[name] = fields
    return out


def _ctype(ty, known):
    arr = re.fullmatch(r"(.*)\[(\d+)\]", ty)
    if arr:
        return _ctype(arr.group(1), known) * int(arr.group(2))
    base = ty.replace("const", "")
    if base.endswith("*"):
        return ctypes.c_void_p
    if base in _SCALARS:
        return _SCALARS[base]
    if base in known:
        return known[base]
    raise ValueError(f"member type {ty!r} not understood")


def ctypes_structs(header_text, names=("SsdParams", "SsdBwdParams")):
    parsed = parse_structs(header_text, names)
    made = {}
    enums = enum_types(header_text)
    for name in names:
        known = {**enums, **made}
        made[name] = type(name, (ctypes.Structure,), {"_fields_": [(n, _ctype(t, known)) for n, t in parsed[name]]})
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
