"""Every TensorRT name export.py and infer_trt.py use exists in TensorRT 11.4 with a compatible
signature, and gets arguments of the right types.

TensorRT cannot be installed on our machines, so its code never runs in CI. This test reads the code
with the ast module and checks each use against the API of the real 11.4.0.106 bindings: every class,
enum member, method and property with its signatures, read from the tensorrt-cu13-bindings 11.4.0.106
module (tests/tensorrt-11.4.0.106-api.json). A small type inference follows every object that
comes from `tensorrt`, whatever its name: the module itself (`import tensorrt as trt`, or a function
that returns it), constructors, the documented return types of methods, `self.x = ...` attributes,
`with ... as x`, loop variables, function parameters (from the call sites in the same file), return
values, closures and getattr(obj, "name"). On those it checks
  trt.X, trt.X.Y            module attributes, classes, enum members
  trt.C(args)               constructor arity, keywords and argument types against C.__init__
  obj.m(args), obj.p = v    method arity, keywords and argument types; writable properties
Argument types are checked where both sides are known: the dump's annotation (str, int, bool, tuple/list/
Dims, a buffer, an enum or a TensorRT class) against the inferred type of the argument (a literal, a
TensorRT object, a torch tensor or stream, an int from data_ptr() or a CUDA stream handle, ...).
Not checkable from the dump (dunder members are not in it): iterating/indexing Dims, and writing
IHostMemory to a file through the buffer protocol.
"""
import ast
import json
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_PATH = os.path.join(ROOT, "tests", "tensorrt-11.4.0.106-api.json")
FILES = ("export.py", "infer_trt.py")
MODULE = ("module",)
RETURN_ALIASES = {"nvonnxparser::IParserError": "ParserError"}   # the dump names the C++ type here
SUBCLASSES = {"ILogger": {"Logger"}}                             # base classes the dump does not record
@pytest.fixture(scope="module")
def api():
    with open(API_PATH) as f:
        data = json.load(f)
    assert data["version"].startswith("11.4")
    return data


# ----------------------------------------------------------------------------------------------
#                                 Signatures and a tiny type checker
# ----------------------------------------------------------------------------------------------

def split_top(text):
    """Split on commas outside brackets: 'a: list[int, str], b = <E.X: 0>' -> ['a: list[int, str]', 'b = <E.X: 0>']."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[(<":
            depth += 1
        elif ch in "])>":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [p for p in parts + [cur.strip()] if p]


def parse_signature(sig):
    """'1. name(self: T, a: X, b: Y = d) -> R' -> ([(param, has_default)], return type string)."""
    m = re.match(r"^(?:\d+\.\s*)?\w+\((.*)\)\s*->\s*(.+)$", sig)
    params = []
    for part in split_top(m.group(1)):
        name = part.split(":")[0].split("=")[0].strip()
        if name != "self":
            params.append((name, " = " in part))
    return params, m.group(2).strip()


def accepts(params, n_positional, keywords):
    """Could a call with n positional args and these keyword names bind to params?"""
    names = [p for p, _ in params]
    if n_positional > len(params) or any(k not in names[n_positional:] for k in keywords):
        return False
    return all(has_default or i < n_positional or p in keywords for i, (p, has_default) in enumerate(params))


def return_class(api, signatures):
    """The TensorRT class a method returns (first overload), if any."""
    if not signatures:
        return None
    ret = parse_signature(signatures[0])[1]
    ret = RETURN_ALIASES.get(ret, ret.replace("tensorrt_bindings.tensorrt.", ""))
    return ret if ret in api["classes"] else None


# ----------------------------------------------------------------------------------------------
#                          Following TensorRT objects through a file
# ----------------------------------------------------------------------------------------------
# A type is MODULE, ("class", C), ("inst", C), ("enum", C) for a member of enum C, ("py", "int" | "str" |
# "bool" | "bytes" | "tuple" | "list" | "float" | "None"), ("foreign", "torch.Tensor" | ...) or None (unknown).

FOREIGN_CALLS = {"torch.cuda.Stream": "torch.cuda.Stream", "torch.empty": "torch.Tensor", "torch.zeros": "torch.Tensor",
                 "torch.ones": "torch.Tensor", "torch.tensor": "torch.Tensor", "torch.randn": "torch.Tensor",
                 "torch.cuda.CUDAGraph": "torch.cuda.CUDAGraph", "torch.device": "torch.device",
                 "empty_aligned": "torch.Tensor"}                # infer_trt.empty_aligned: a view of torch.empty
PY_CALLS = {"len": "int", "int": "int", "str": "str", "bytes": "bytes", "tuple": "tuple", "list": "list",
            "float": "float", "bool": "bool", "range": "range"}
INT_METHODS = {"data_ptr", "numel", "element_size", "nbytes"}     # torch methods that return ints
INT_ATTRIBUTES = {"cuda_stream"}                                  # torch.cuda.Stream.cuda_stream: the handle


def dotted(node):
    """'torch.cuda.Stream' for the expression torch.cuda.Stream, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


class Inference(ast.NodeVisitor):
    """Infers, to a fixed point, the types of names, self attributes, parameters and return values in a file."""

    def __init__(self, api, tree, imported=None):
        self.api, self.tree, self.imported = api, tree, imported or {}   # imported: name -> return type
        self.env, self.attrs, self.returns, self.functions = {}, {}, {}, {}
        self.scope, self.cls, self.changed = (), None, False
        self.collect(tree, (), None)

    def collect(self, node, scope, cls):
        """Every function by its scope path, with the class it is a method of."""
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.functions[scope + (child.name,)] = (child, cls)
                self.collect(child, scope + (child.name,), cls)
            elif isinstance(child, ast.ClassDef):
                self.collect(child, scope + (child.name,), child.name)
            else:
                self.collect(child, scope, cls)

    def run(self):
        for _ in range(20):
            self.changed = False
            self.walk(self.tree, (), None)
            if not self.changed:
                return self
        raise AssertionError("type inference did not settle")

    def walk(self, node, scope, cls):
        saved, (self.scope, self.cls) = (self.scope, self.cls), (scope, cls)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.walk(child, scope + (child.name,), cls)
            elif isinstance(child, ast.ClassDef):
                self.walk(child, scope + (child.name,), child.name)
            else:
                self.visit(child)
        self.scope, self.cls = saved

    def set(self, table, key, value):
        if value is not None and table.get(key) is None:
            table[key], self.changed = value, True

    # -------------------------------------------------------------------- bindings

    def bind(self, target, value):
        if isinstance(target, ast.Name):
            self.set(self.env, (self.scope, target.id), value)
        elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
            self.set(self.attrs, (self.cls, target.attr), value)
        elif isinstance(target, (ast.Tuple, ast.List)) and value and value[0] == "elements":
            for t, v in zip(target.elts, value[1]):
                self.bind(t, v)

    def visit_Import(self, node):
        for alias in node.names:
            if alias.name == "tensorrt":
                self.set(self.env, (self.scope, alias.asname or "tensorrt"), MODULE)

    def visit_Assign(self, node):
        value = self.type_of(node.value, elements=True)
        for target in node.targets:
            self.bind(target, value)
        self.generic_visit(node)

    def visit_With(self, node):
        for item in node.items:
            if item.optional_vars is not None:              # TensorRT objects' __enter__ returns self
                self.bind(item.optional_vars, self.type_of(item.context_expr))
        self.generic_visit(node)

    def visit_For(self, node):
        it = node.iter
        if isinstance(it, (ast.List, ast.Tuple)) and it.elts:
            self.bind(node.target, self.type_of(it.elts[0]))
        elif isinstance(it, ast.Call) and dotted(it.func) == "range":
            self.bind(node.target, ("py", "int"))
        self.generic_visit(node)

    def visit_Return(self, node):
        if node.value is not None:
            self.set(self.returns, self.scope, self.type_of(node.value))
        self.generic_visit(node)

    def visit_Call(self, node):
        target = self.function_called(node)
        if target:
            fn, is_method = self.functions[target][0], self.functions[target][1] is not None
            params = [a.arg for a in fn.args.args][1 if is_method and fn.args.args and fn.args.args[0].arg == "self" else 0:]
            for name, arg in zip(params, node.args):
                self.set(self.env, (target, name), self.type_of(arg))
            for kw in node.keywords:
                if kw.arg in params:
                    self.set(self.env, (target, kw.arg), self.type_of(kw.value))
        self.generic_visit(node)

    def function_called(self, node):
        """The scope path of the file's own function a call goes to, if it is one."""
        if isinstance(node.func, ast.Name):
            for depth in range(len(self.scope), -1, -1):       # innermost definition first
                key = self.scope[:depth] + (node.func.id,)
                if key in self.functions:
                    return key
        if isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name) and \
                node.func.value.id == "self" and self.cls:
            for key, (_, cls) in self.functions.items():
                if cls == self.cls and key[-1] == node.func.attr and key[-2] == self.cls:
                    return key
        return None

    # -------------------------------------------------------------------- expressions

    def lookup(self, name):
        for depth in range(len(self.scope), -1, -1):           # closures see their enclosing functions
            if (self.scope[:depth], name) in self.env:
                return self.env[(self.scope[:depth], name)]
        return None

    def type_of(self, node, elements=False):
        if isinstance(node, ast.Constant):
            return ("py", "None" if node.value is None else type(node.value).__name__)
        if isinstance(node, ast.JoinedStr):
            return ("py", "str")
        if isinstance(node, (ast.Tuple, ast.List)):
            if elements:
                return ("elements", [self.type_of(e) for e in node.elts])
            return ("py", "tuple" if isinstance(node, ast.Tuple) else "list")
        if isinstance(node, ast.Compare):
            return ("py", "bool")
        if isinstance(node, ast.Name):
            return self.lookup(node.id)
        if isinstance(node, ast.Attribute):
            return self.attribute_type(self.receiver(node.value), node.attr)
        if isinstance(node, ast.Call):
            return self.call_type(node)
        return None

    def receiver(self, node):
        if isinstance(node, ast.Name) and node.id == "self" and self.cls:
            return ("self", self.cls)
        return self.type_of(node)

    def attribute_type(self, owner, attr):
        if owner is None:
            return None
        if owner[0] == "self":
            return self.attrs.get((owner[1], attr))
        if owner == MODULE:
            if attr in self.api["classes"]:
                return ("class", attr)
            return ("py", "str") if attr == "__version__" else None
        if owner[0] == "class":
            members = self.api["classes"][owner[1]]
            if attr in members.get("enum", []) or members["members"].get(attr, {}).get("kind") not in ("method", "property", None):
                return ("enum", owner[1])
            return None
        if owner[0] == "foreign" and attr in INT_ATTRIBUTES:
            return ("py", "int")
        return None

    def call_type(self, node):
        func = node.func
        name = dotted(func)
        if name in FOREIGN_CALLS:
            return ("foreign", FOREIGN_CALLS[name])
        if name in PY_CALLS:
            return ("py", PY_CALLS[name])
        if name == "getattr" and len(node.args) >= 2:          # getattr(obj, "name") is obj.name
            return None
        base = self.type_of(func)
        if base and base[0] == "class":                        # a constructor
            return ("inst", base[1])
        target = self.function_called(node)
        if target:
            return self.returns.get(target)
        if isinstance(func, ast.Name) and func.id in self.imported:   # another file's function
            return self.imported[func.id]
        if isinstance(func, ast.Attribute):
            if func.attr in INT_METHODS:
                return ("py", "int")
            owner = self.receiver(func.value)      # ("self", C) here: a method of ours, not found above
            if owner and owner[0] == "inst":
                member = self.api["classes"][owner[1]]["members"].get(func.attr, {})
                cls = return_class(self.api, member.get("signatures"))
                return ("inst", cls) if cls else None
            if owner and owner[0] == "foreign" and func.attr in ("float", "contiguous", "to", "clone"):
                return owner
        return None


# ----------------------------------------------------------------------------------------------
#                                          The checks
# ----------------------------------------------------------------------------------------------

def compatible(annotation, arg):
    """Whether a value of the inferred type `arg` may be passed where the dump says `annotation`."""
    if arg is None or arg[0] == "self":
        return True                                          # unknown: nothing to check
    ann = annotation.replace("tensorrt_bindings.tensorrt.", "").strip()
    kind, what = arg[0], arg[1] if len(arg) > 1 else None
    if ann in ("object", "typing.Any") or ann.startswith("typing.Optional"):
        return True
    if ann == "str":
        return arg == ("py", "str")
    if ann in ("typing.SupportsInt", "int"):
        return arg in (("py", "int"), ("py", "bool"))
    if ann in ("typing.SupportsFloat", "float"):
        return arg in (("py", "int"), ("py", "float"), ("py", "bool"))
    if ann == "bool":
        return arg in (("py", "bool"), ("py", "int"))
    if ann in ("tuple", "list", "Dims") or ann.startswith(("collections.abc.Sequence", "list[", "tuple[")):
        return arg in (("py", "tuple"), ("py", "list"), ("inst", "Dims"))
    if "Buffer" in ann or ann == "buffer":
        return arg in (("py", "bytes"), ("inst", "IHostMemory"))
    if ann in SUBCLASSES or re.fullmatch(r"[A-Z]\w*(\.\w+)?", ann):     # a TensorRT class or enum
        if kind == "enum":
            return ann.split(".")[-1] == what or ann.endswith("Severity")
        if kind == "inst":
            return what == ann or what in SUBCLASSES.get(ann, ())
        return False
    return True                                              # an annotation we do not model


class Checker(ast.NodeVisitor):
    """Walk a file with the inferred types; record every TensorRT use and every problem."""

    def __init__(self, api, filename, tree, imported=None):
        self.api, self.filename = api, filename
        self.types = Inference(api, tree, imported).run()
        self.uses, self.problems, self.parents = [], [], {}

    def problem(self, node, text):
        self.problems.append(f"{self.filename}:{node.lineno}: {text}")

    def walk(self, node, scope=(), cls=None):
        self.types.scope, self.types.cls = scope, cls
        for child in ast.iter_child_nodes(node):
            self.parents[child] = node
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.walk(child, scope + (child.name,), cls)
                self.types.scope, self.types.cls = scope, cls
            elif isinstance(child, ast.ClassDef):
                self.walk(child, scope + (child.name,), child.name)
                self.types.scope, self.types.cls = scope, cls
            else:
                check = getattr(self, f"visit_{type(child).__name__}", None)
                if check:
                    check(child)
                self.walk(child, scope, cls)

    def check_call(self, node, signatures, what):
        n = len(node.args)
        keywords = [k.arg for k in node.keywords]
        if any(isinstance(a, ast.Starred) for a in node.args) or None in keywords:
            self.problem(node, f"{what}: *args/**kwargs calls cannot be checked; pass arguments explicitly")
            return
        fitting = [s for s in signatures if accepts(parse_signature(s)[0], n, keywords)]
        if not fitting:
            self.problem(node, f"{what} called with {n} positional and {keywords} keyword arguments, "
                               f"11.4 has {signatures}")
            return
        args = {**{i: a for i, a in enumerate(node.args)}, **{k.arg: k.value for k in node.keywords}}
        wrong = None
        for sig in fitting:
            annotations = annotations_of(sig)
            bad = [(i, ann) for i, ann in enumerate(annotations) if i < n and not compatible(ann[1], self.types.type_of(args[i]))]
            bad += [(k, ann) for k, ann in ((k, next((a for a in annotations if a[0] == k), None)) for k in keywords)
                    if ann and not compatible(ann[1], self.types.type_of(args[k]))]
            if not bad:
                return
            wrong = bad[0]
        where, (param, ann) = wrong
        ann = ann.replace("tensorrt_bindings.tensorrt.", "")
        self.problem(node, f"{what}: argument {param!r} must be {ann}, got {ast.unparse(args[where])} "
                           f"({self.types.type_of(args[where])})")

    def member_use(self, node, owner, attr, parent, store=False):
        """Check owner.attr, where owner is a TensorRT type; node is the expression that reads or calls it."""
        if owner == MODULE:
            found = attr == "__version__" or any(attr in self.api[k] for k in ("classes", "functions", "constants"))
            self.uses.append((node.lineno, f"trt.{attr}"))
            if not found:
                self.problem(node, f"trt.{attr} does not exist in TensorRT 11.4")
            return
        if owner[0] not in ("class", "inst"):
            return
        cls = owner[1]
        info = self.api["classes"][cls]
        member = info["members"].get(attr)
        self.uses.append((node.lineno, f"{cls}.{attr}"))
        if member is None and attr not in info.get("enum", []):
            self.problem(node, f"{cls}.{attr} does not exist in TensorRT 11.4")
        elif member and isinstance(parent, ast.Call) and parent.func is node:
            if member["kind"] != "method":
                self.problem(node, f"{cls}.{attr} is a {member['kind']}, not a method")
            else:
                self.check_call(parent, member["signatures"], f"{cls}.{attr}")
        elif member and store:
            if member["kind"] != "property" or not member.get("writable"):
                self.problem(node, f"{cls}.{attr} is not a writable property in TensorRT 11.4")

    def visit_Attribute(self, node):
        owner = self.types.receiver(node.value)
        if owner and owner[0] == "self":
            return
        if owner:
            self.member_use(node, owner, node.attr, self.parents.get(node), isinstance(node.ctx, ast.Store))

    def visit_Call(self, node):
        if dotted(node.func) == "getattr" and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
            owner = self.types.receiver(node.args[0])
            if owner and owner[0] != "self":
                self.member_use(node, owner, node.args[1].value, self.parents.get(node))
        base = self.types.type_of(node.func)
        if base and base[0] == "class":
            init = self.api["classes"][base[1]]["members"].get("__init__", {}).get("signatures") or []
            if init:
                self.check_call(node, init, f"trt.{base[1]}()")


def annotations_of(sig):
    """[(param, annotation)] of a dump signature, self excluded."""
    m = re.match(r"^(?:\d+\.\s*)?\w+\((.*)\)\s*->", sig)
    out = []
    for part in split_top(m.group(1)):
        name, _, rest = part.partition(":")
        if name.strip() != "self":
            out.append((name.strip(), rest.split(" = ")[0].strip()))
    return out


def check_source(api, source, filename="<snippet>", imported=None):
    tree = ast.parse(source)
    checker = Checker(api, filename, tree, imported)
    checker.walk(tree)
    return checker


def exported_returns(checker):
    """Return types of a file's top-level functions, for the files that import them (import_tensorrt -> module)."""
    return {key[0]: t for key, t in checker.types.returns.items() if len(key) == 1}


def check_files(api, sources):
    """{file: source} -> checkers; infer_trt.py (the runtime) first, its functions' return types known to the
    others."""
    first = check_source(api, sources["infer_trt.py"], "infer_trt.py")
    return [first] + [check_source(api, src, name, exported_returns(first)) for name, src in sources.items()
                      if name != "infer_trt.py"]


def read_sources():
    sources = {}
    for name in FILES:
        with open(os.path.join(ROOT, name)) as f:
            sources[name] = f.read()
    return sources


@pytest.fixture(scope="module")
def checked(api):
    return check_files(api, read_sources())


# ----------------------------------------------------------------------------------------------

def test_every_tensorrt_use_exists_in_11_4(checked):
    problems = [p for c in checked for p in c.problems]
    assert not problems, "\n".join(problems)


def test_the_scan_sees_the_tensorrt_code(checked):
    """Guards the guard: if the naming convention broke, the scan would silently check nothing."""
    uses = {u for c in checked for _, u in c.uses}
    expected = {
        "trt.Builder", "trt.OnnxParser", "trt.Runtime", "trt.Logger", "trt.__version__",
        "Logger.WARNING", "DataType.HALF", "DataType.INT64", "MemoryPoolType.WORKSPACE",
        "Builder.create_network", "Builder.create_builder_config", "Builder.create_optimization_profile",
        "Builder.build_serialized_network", "OnnxParser.parse_from_file", "OnnxParser.get_error",
        "OnnxParser.num_errors", "ParserError.desc", "IBuilderConfig.set_memory_pool_limit",
        "IBuilderConfig.builder_optimization_level", "IBuilderConfig.add_optimization_profile",
        "IBuilderConfig.create_timing_cache", "IBuilderConfig.set_timing_cache", "IBuilderConfig.get_timing_cache",
        "ITimingCache.serialize", "IOptimizationProfile.set_shape", "Runtime.deserialize_cuda_engine",
        "ICudaEngine.create_execution_context", "ICudaEngine.get_tensor_name", "ICudaEngine.num_io_tensors",
        "ICudaEngine.get_tensor_dtype", "ICudaEngine.get_tensor_profile_shape",
        "IExecutionContext.set_input_shape", "IExecutionContext.set_tensor_address",
        "IExecutionContext.get_tensor_shape", "IExecutionContext.execute_async_v3",
    }
    assert expected <= uses, f"not seen by the scan: {sorted(expected - uses)}"


def test_no_weak_typing_flags(api, checked):
    """TensorRT 11 removed BuilderFlag.FP16 (fp16 comes from the ONNX types); we must not use it."""
    assert "FP16" not in api["classes"]["BuilderFlag"]["enum"]
    uses = {u for c in checked for _, u in c.uses}
    assert not {u for u in uses if u.startswith("BuilderFlag.") or u.startswith("NetworkDefinitionCreationFlag.")}
    assert "IBuilderConfig.set_flag" not in uses


TRT10_CODE = """
import tensorrt as trt
import torch


def build(onnx_path):
    logger = trt.Logger(trt.Logger.WARNING)
    b = trt.Builder(logger)
    cfg = b.create_builder_config()
    cfg.set_flag(trt.BuilderFlag.FP16)
    net = b.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
    p = trt.OnnxParser(net)
    cfg.num_optimization_profiles = 2
    plan = b.build_serialized_network(net, cfg)
    with trt.Runtime(logger) as rt:
        eng = rt.deserialize_cuda_engine(plan, strict=True)
    for ctx in [eng.create_execution_context()]:
        ctx.execute_async_v3()
    return eng


def run(eng, stream):
    size = eng.device_memory_size
    ctx = eng.create_execution_context()
    getattr(ctx, "execute_async_v2")(0)
    enqueue(ctx, stream)


def enqueue(context_arg, stream):
    context_arg.set_tensor_address("x")


def start():
    run(build("m.onnx"), torch.cuda.Stream())
"""


def test_the_checker_catches_10x_code_under_any_name(api):
    """Code written for TensorRT 10, its objects under names of no convention, through with, loops, parameters,
    return values and getattr: every removed or misused call is found."""
    problems = "\n".join(check_source(api, TRT10_CODE).problems)
    for text in ("BuilderFlag.FP16 does not exist", "NetworkDefinitionCreationFlag.EXPLICIT_BATCH does not exist",
                 "ICudaEngine.device_memory_size does not exist", "IExecutionContext.execute_async_v3 called with 0",
                 "IExecutionContext.set_tensor_address called with 1", "num_optimization_profiles is not a writable",
                 "trt.OnnxParser() called with 1", "Runtime.deserialize_cuda_engine called with 1 positional and ['strict']",
                 "IExecutionContext.execute_async_v2 does not exist"):
        assert text in problems, f"{text!r} not reported in:\n{problems}"


WRONG_TYPES = """
import tensorrt as trt


class Engine:
    def __init__(self, path):
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(open(path, "rb").read())
        self.ctx = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()

    def __call__(self, x):
        out = torch.empty(3)
        self.ctx.set_tensor_address("x", out)
        self.ctx.set_input_shape(7, (1, 2))
        self.ctx.execute_async_v3(self.stream)
        self.ctx.execute_async_v3(self.stream.cuda_stream)
        self.ctx.set_tensor_address("x", out.data_ptr())
        self.ctx.set_input_shape("x", tuple(x.shape))
        trt.Builder(self.runtime)
"""


def test_the_checker_catches_wrong_argument_types(api):
    problems = check_source(api, WRONG_TYPES).problems
    text = "\n".join(problems)
    for wanted in ("set_tensor_address: argument 'memory' must be typing.SupportsInt, got out",
                   "set_input_shape: argument 'name' must be str, got 7",
                   "execute_async_v3: argument 'stream_handle' must be typing.SupportsInt, got self.stream",
                   "trt.Builder(): argument 'logger' must be ILogger, got self.runtime"):
        assert wanted in text, f"{wanted!r} not reported in:\n{text}"
    assert len(problems) == 4, text                  # the right calls (handle, data_ptr, tuple) pass


@pytest.mark.parametrize("file,old,new,wanted", [
    ("infer_trt.py", "execute_async_v3(self.stream.cuda_stream)", "execute_async_v2(self.stream.cuda_stream)",
     "IExecutionContext.execute_async_v2 does not exist"),                   # a removed call on a parameter
    ("infer_trt.py", "execute_async_v3(self.stream.cuda_stream)", "execute_async_v3(self.stream)",
     "argument 'stream_handle' must be typing.SupportsInt, got self.stream"),  # a stream, not its handle
    ("infer_trt.py", "context.set_tensor_address(name, v.data_ptr())", "context.set_tensor_address(name, v)",
     "argument 'memory' must be typing.SupportsInt, got v"),
    ("export.py", "    builder_config = builder.create_builder_config()\n",
     "    cfg = builder.create_builder_config()\n    cfg.set_flag(trt.BuilderFlag.FP16)\n    builder_config = cfg\n",
     "BuilderFlag.FP16 does not exist"),                                     # any variable name
    ("export.py", "    network = builder.create_network(0)",
     "    with builder.create_network(0) as net:\n        net.mark_output_v2(None)\n    network = net",
     "INetworkDefinition.mark_output_v2 does not exist"),                    # a with target
])
def test_a_mistake_planted_in_the_real_code_fails_the_check(api, file, old, new, wanted):
    sources = read_sources()
    assert sources[file].count(old) == 1, f"the code changed: {old!r} is not in {file} once"
    sources[file] = sources[file].replace(old, new)
    problems = "\n".join(p for c in check_files(api, sources) for p in c.problems)
    assert wanted in problems, f"{wanted!r} not reported in:\n{problems}"


def test_signature_parser():
    params, ret = parse_signature("2. create_execution_context(self: tensorrt_bindings.tensorrt.ICudaEngine, "
                                  "strategy: tensorrt_bindings.tensorrt.ExecutionContextAllocationStrategy = "
                                  "<ExecutionContextAllocationStrategy.STATIC: 0>) -> tensorrt_bindings.tensorrt.IExecutionContext")
    assert params == [("strategy", True)] and ret.endswith("IExecutionContext")
    params, _ = parse_signature("set_shape_input(self: X, input: str, min: collections.abc.Sequence[typing.SupportsInt], "
                                "opt: collections.abc.Sequence[typing.SupportsInt], max: list[int, str]) -> None")
    assert [p for p, _ in params] == ["input", "min", "opt", "max"]
    assert accepts([("a", False), ("b", True)], 1, []) and accepts([("a", False), ("b", True)], 0, ["a"])
    assert not accepts([("a", False), ("b", True)], 0, []) and not accepts([("a", False)], 2, [])
