"""Every TensorRT name runtime.py and export.py use exists in TensorRT 11.4 with a compatible signature.

TensorRT cannot be installed on our machines, so its code never runs in CI. This test reads the code
with the ast module and checks each use against the API dumped from the real 11.4.0.106 bindings
(../shared/trt-api/tensorrt-11.4.0.106-api.json):
  trt.X, trt.X.Y            module attributes, classes, enum members
  trt.C(args)               constructor arity and keywords against C.__init__
  obj.m(args), obj.p = v    method arity/keywords, writable properties, on TensorRT objects
A TensorRT object is recognised by the name it is stored under (NAMES below: `engine`, `self.engine`,
...) or by being the result of a call whose documented return type is a TensorRT class; a test
checks that every stored TensorRT object uses the name of its class, so no call escapes the check.
Not checkable from the dump (dunder members are not in it): iterating/indexing Dims, and writing
IHostMemory to a file through the buffer protocol.
"""
import ast
import json
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_PATH = os.path.join(ROOT, "..", "shared", "trt-api", "tensorrt-11.4.0.106-api.json")
FILES = ("runtime.py", "export.py", "infer_trt.py")

# Variable (or self attribute) name -> the TensorRT class of the object it holds.
NAMES = {"logger": "Logger", "builder": "Builder", "network": "INetworkDefinition", "onnx_parser": "OnnxParser",
         "builder_config": "IBuilderConfig", "profile": "IOptimizationProfile", "cache": "ITimingCache",
         "plan": "IHostMemory", "runtime": "Runtime", "engine": "ICudaEngine", "context": "IExecutionContext"}
MODULE = ("module",)
RETURN_ALIASES = {"nvonnxparser::IParserError": "ParserError"}   # the dump names the C++ type here


@pytest.fixture(scope="module")
def api():
    if not os.path.isfile(API_PATH):
        pytest.skip(f"{API_PATH} is absent (it lives in the shared folder beside the repository)")
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


class Checker(ast.NodeVisitor):
    """Walk a file; record every TensorRT use as (line, 'Class.member' or 'trt.name') and every problem."""

    def __init__(self, api, filename):
        self.api, self.filename = api, filename
        self.uses, self.problems, self.parents = [], [], {}

    def problem(self, node, text):
        self.problems.append(f"{self.filename}:{node.lineno}: {text}")

    def type_of(self, node):
        """MODULE, ('class', C) for a class object, ('inst', C) for an instance, or None (not TensorRT)."""
        if isinstance(node, ast.Name):
            return MODULE if node.id == "trt" else ("inst", NAMES[node.id]) if node.id in NAMES else None
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "self":
                return ("inst", NAMES[node.attr]) if node.attr in NAMES else None
            if self.type_of(node.value) == MODULE and node.attr in self.api["classes"]:
                return ("class", node.attr)
            return None
        if isinstance(node, ast.Call):
            base = self.type_of(node.func)
            if base and base[0] == "class":                                   # a constructor
                return ("inst", base[1])
            if isinstance(node.func, ast.Attribute):
                owner = self.type_of(node.func.value)
                if owner and owner[0] == "inst":
                    member = self.api["classes"][owner[1]]["members"].get(node.func.attr, {})
                    cls = return_class(self.api, member.get("signatures"))
                    return ("inst", cls) if cls else None
        return None

    def check_call(self, node, signatures, what):
        n = len(node.args)
        keywords = [k.arg for k in node.keywords]
        if any(isinstance(a, ast.Starred) for a in node.args) or None in keywords:
            self.problem(node, f"{what}: *args/**kwargs calls cannot be checked; pass arguments explicitly")
        elif not any(accepts(*[parse_signature(s)[0]], n, keywords) for s in signatures):
            self.problem(node, f"{what} called with {n} positional and {keywords} keyword arguments, "
                               f"11.4 has {signatures}")

    def generic_visit(self, node):
        for child in ast.iter_child_nodes(node):
            self.parents[child] = node
        super().generic_visit(node)

    def visit_Call(self, node):
        base = self.type_of(node.func)
        if base and base[0] == "class":
            init = self.api["classes"][base[1]]["members"].get("__init__", {}).get("signatures") or []
            if init:
                self.check_call(node, init, f"trt.{base[1]}()")
        self.generic_visit(node)

    def visit_Assign(self, node):
        kind = self.type_of(node.value)
        for target in node.targets:
            name = target.id if isinstance(target, ast.Name) else \
                target.attr if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) \
                and target.value.id == "self" else None
            if kind and kind[0] == "inst" and NAMES.get(name) != kind[1]:
                self.problem(node, f"a TensorRT {kind[1]} is stored as {name!r}: name it as in NAMES "
                                   f"({[k for k, v in NAMES.items() if v == kind[1]] or 'add it there'})")
        self.generic_visit(node)

    def visit_Attribute(self, node):
        owner = self.type_of(node.value)
        parent = self.parents.get(node)
        if owner == MODULE:
            found = node.attr == "__version__" or any(node.attr in self.api[k] for k in ("classes", "functions", "constants"))
            self.uses.append((node.lineno, f"trt.{node.attr}"))
            if not found:
                self.problem(node, f"trt.{node.attr} does not exist in TensorRT 11.4")
        elif owner:
            cls = owner[1]
            info = self.api["classes"][cls]
            member = info["members"].get(node.attr)
            self.uses.append((node.lineno, f"{cls}.{node.attr}"))
            if member is None and node.attr not in info.get("enum", []):
                self.problem(node, f"{cls}.{node.attr} does not exist in TensorRT 11.4")
            elif member and isinstance(parent, ast.Call) and parent.func is node:
                if member["kind"] != "method":
                    self.problem(node, f"{cls}.{node.attr} is a {member['kind']}, not a method")
                else:
                    self.check_call(parent, member["signatures"], f"{cls}.{node.attr}")
            elif member and isinstance(node.ctx, ast.Store):
                if member["kind"] != "property" or not member.get("writable"):
                    self.problem(node, f"{cls}.{node.attr} is not a writable property in TensorRT 11.4")
        self.generic_visit(node)


def check_source(api, source, filename="<snippet>"):
    checker = Checker(api, filename)
    checker.visit(ast.parse(source))
    return checker


@pytest.fixture(scope="module")
def checked(api):
    results = []
    for name in FILES:
        with open(os.path.join(ROOT, name)) as f:
            results.append(check_source(api, f.read(), name))
    return results


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


def test_the_checker_catches_10x_code(api):
    """Code written for TensorRT 10 must fail the check: the test above can fail."""
    source = (
        "def build(trt, builder, builder_config, engine, context, logger):\n"
        "    builder_config.set_flag(trt.BuilderFlag.FP16)\n"
        "    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))\n"
        "    size = engine.device_memory_size\n"
        "    context.execute_async_v3()\n"
        "    context.set_tensor_address('x')\n"
        "    builder_config.num_optimization_profiles = 2\n"
        "    net = builder.create_network(0)\n"
        "    parser = trt.OnnxParser(network)\n"
        "    trt.Runtime(logger).deserialize_cuda_engine(b'', strict=True)\n")
    problems = "\n".join(check_source(api, source).problems)
    for text in ("BuilderFlag.FP16 does not exist", "NetworkDefinitionCreationFlag.EXPLICIT_BATCH does not exist",
                 "ICudaEngine.device_memory_size does not exist", "IExecutionContext.execute_async_v3 called with 0",
                 "IExecutionContext.set_tensor_address called with 1", "num_optimization_profiles is not a writable",
                 "INetworkDefinition is stored as 'net'", "trt.OnnxParser() called with 1",
                 "OnnxParser is stored as 'parser'", "Runtime.deserialize_cuda_engine called with 1 positional and ['strict']"):
        assert text in problems, f"{text!r} not reported in:\n{problems}"


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
