"""Loading libpeer and declaring its C API for ctypes.

The structs and prototypes below mirror include/peer.h (and, where the library
was built with CUDA, include/peer_cuda.h).  Where the library is found:
  1. the PEER_LIBRARY environment variable (a path to libpeer.so);
  2. build/lib/ of the repository this package sits in (an editable install or
     a checkout), or the one recorded when the package was pip-installed;
  3. the system's search path (ctypes.util.find_library("peer")).
A library is used only if its version (peer_version_number) is the one these
declarations follow (ABI_VERSION) and, for every struct declared here, its
peer_struct_size equals ctypes.sizeof; otherwise LibraryMismatch names each
difference (and the next candidate is tried, unless PEER_LIBRARY chose it).
"""

import ctypes
import ctypes.util
import os
import sys

c_int64_p = ctypes.POINTER(ctypes.c_int64)
c_float_p = ctypes.POINTER(ctypes.c_float)
c_double_p = ctypes.POINTER(ctypes.c_double)


class peer_config(ctypes.Structure):
    _fields_ = [
        ("d_model", ctypes.c_int64),
        ("n_heads", ctypes.c_int64),
        ("d_key", ctypes.c_int64),
        ("n_subkeys", ctypes.c_int64),
        ("top_k", ctypes.c_int64),
        ("subkey_top_k", ctypes.c_int64),
        ("shared_keys", ctypes.c_int),
        ("activation", ctypes.c_int),
        ("gate", ctypes.c_int),
        ("query_norm", ctypes.c_int),
        ("query_bias", ctypes.c_int),
        ("weight_dtype", ctypes.c_int),
    ]


class peer_options(ctypes.Structure):
    _fields_ = [("backend", ctypes.c_int), ("n_threads", ctypes.c_int), ("device", ctypes.c_int)]


class peer_tensor(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("dtype", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("shape", ctypes.c_int64 * 4),
        ("data", ctypes.c_void_p),
        ("nbytes", ctypes.c_size_t),
    ]


class peer_grads(ctypes.Structure):
    _fields_ = [
        ("query_weight", ctypes.c_void_p),
        ("query_bias", ctypes.c_void_p),
        ("norm_weight", ctypes.c_void_p),
        ("norm_bias", ctypes.c_void_p),
        ("keys", ctypes.c_void_p),
        ("experts_dense", ctypes.c_int),
        ("expert_capacity", ctypes.c_int64),
        ("expert_rows", ctypes.c_void_p),
        ("experts_down", ctypes.c_void_p),
        ("experts_up", ctypes.c_void_p),
        ("n_expert_rows", ctypes.c_int64),
    ]


class peer_optim_config(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int),
        ("lr", ctypes.c_float),
        ("momentum", ctypes.c_float),
        ("beta1", ctypes.c_float),
        ("beta2", ctypes.c_float),
        ("eps", ctypes.c_float),
        ("weight_decay", ctypes.c_float),
        ("expert_lr", ctypes.c_float),
        ("expert_kind", ctypes.c_int),
    ]


# The library version these declarations follow (peer.h's PEER_VERSION_MAJOR
# and _MINOR).  While the major version is 0 a minor release may change the
# ABI, so both must match; from 1.0 on the major must match and the library's
# minor be at least this one.
ABI_VERSION = (0, 1)
# Every struct declared above, by its C name: load_library compares each
# ctypes.sizeof with the library's own peer_struct_size.
STRUCTS = {
    "peer_config": peer_config,
    "peer_options": peer_options,
    "peer_tensor": peer_tensor,
    "peer_grads": peer_grads,
    "peer_optim_config": peer_optim_config,
}

P = ctypes.c_void_p
I64 = ctypes.c_int64
STATUS = ctypes.c_int
_PROTOTYPES = {
    # name: (restype, argtypes)
    "peer_version_number": (ctypes.c_int, []),
    "peer_version_string": (ctypes.c_char_p, []),
    "peer_struct_size": (ctypes.c_size_t, [ctypes.c_char_p]),
    "peer_status_string": (ctypes.c_char_p, [ctypes.c_int]),
    "peer_last_error": (ctypes.c_char_p, []),
    "peer_config_default": (None, [ctypes.POINTER(peer_config)]),
    "peer_config_parse": (STATUS, [ctypes.POINTER(peer_config), ctypes.c_char_p]),
    "peer_config_validate": (STATUS, [ctypes.POINTER(peer_config)]),
    "peer_config_n_experts": (I64, [ctypes.POINTER(peer_config)]),
    "peer_config_format": (ctypes.c_int, [ctypes.POINTER(peer_config), ctypes.c_char_p, ctypes.c_size_t]),
    "peer_options_default": (None, [ctypes.POINTER(peer_options)]),
    "peer_layer_create": (STATUS, [ctypes.POINTER(P), ctypes.POINTER(peer_config), ctypes.POINTER(peer_options)]),
    "peer_layer_free": (None, [P]),
    "peer_layer_config": (ctypes.POINTER(peer_config), [P]),
    "peer_layer_set_threads": (STATUS, [P, ctypes.c_int]),
    "peer_layer_threads": (ctypes.c_int, [P]),
    "peer_layer_init": (STATUS, [P, ctypes.c_uint64]),
    "peer_layer_n_params": (ctypes.c_int, [P]),
    "peer_layer_param": (STATUS, [P, ctypes.c_int, ctypes.POINTER(peer_tensor)]),
    "peer_layer_n_parameters": (I64, [P]),
    "peer_layer_n_active_parameters": (I64, [P]),
    "peer_forward": (STATUS, [P, I64, P, P, P, P]),
    "peer_retrieve": (STATUS, [P, I64, P, P, P, P]),
    "peer_retrieve_brute": (STATUS, [P, I64, P, P, P, P]),
    "peer_context_create": (STATUS, [ctypes.POINTER(P), P, I64]),
    "peer_context_free": (None, [P]),
    "peer_layer_set_norm_momentum": (STATUS, [P, ctypes.c_float]),
    "peer_forward_train": (STATUS, [P, P, I64, P, P]),
    "peer_backward": (STATUS, [P, P, P, P, ctypes.POINTER(peer_grads)]),
    "peer_optim_config_default": (peer_optim_config, []),
    "peer_optimizer_create": (STATUS, [ctypes.POINTER(P), P, ctypes.POINTER(peer_optim_config)]),
    "peer_optimizer_free": (None, [P]),
    "peer_optimizer_set_lr": (STATUS, [P, ctypes.c_float, ctypes.c_float]),
    "peer_optimizer_step": (STATUS, [P, ctypes.POINTER(peer_grads)]),
    "peer_optimizer_step_count": (I64, [P]),
    "peer_checkpoint_save": (STATUS, [P, P, ctypes.c_char_p]),
    "peer_checkpoint_load": (STATUS, [P, P, ctypes.c_char_p]),
    "peer_layer_save": (STATUS, [P, ctypes.c_char_p]),
    "peer_layer_load": (STATUS, [ctypes.POINTER(P), ctypes.c_char_p, ctypes.POINTER(peer_options)]),
    "peer_layer_load_pytorch": (STATUS, [ctypes.POINTER(P), ctypes.c_char_p, ctypes.POINTER(peer_config),
                                         ctypes.POINTER(peer_options)]),
    "peer_layer_save_pytorch": (STATUS, [P, ctypes.c_char_p]),
    "peer_config_pytorch_args": (STATUS, [ctypes.POINTER(peer_config), ctypes.c_char_p, ctypes.c_size_t]),
    "peer_convert_from_pytorch": (STATUS, [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(peer_config)]),
    "peer_convert_to_pytorch": (STATUS, [ctypes.c_char_p, ctypes.c_char_p]),
    "peer_usage_metrics": (STATUS, [P, I64, c_double_p, c_double_p]),
    "peer_usage_accumulate": (STATUS, [P, I64, P, P, I64]),
}
# Present only in libraries built with the CUDA backend.
_CUDA_PROTOTYPES = {
    "peer_cuda_device_count": (ctypes.c_int, []),
    "peer_cuda_forward": (STATUS, [P, I64, P, P, P, P, P]),
    "peer_cuda_retrieve": (STATUS, [P, I64, P, P, P, P, P]),
    "peer_cuda_check": (STATUS, [P, P]),
    "peer_cuda_workspace_size": (STATUS, [P, I64, ctypes.POINTER(ctypes.c_size_t)]),
    "peer_cuda_set_workspace": (STATUS, [P, P, ctypes.c_size_t]),
    "peer_cuda_forward_train": (STATUS, [P, P, I64, P, P, P]),
    "peer_cuda_backward": (STATUS, [P, P, P, P, ctypes.POINTER(peer_grads), P, P]),
    "peer_cuda_optimizer_step": (STATUS, [P, ctypes.POINTER(peer_grads), P, P]),
}


def _candidates():
    env = os.environ.get("PEER_LIBRARY")
    if env:
        return [env], True
    names = ["libpeer.dylib"] if sys.platform == "darwin" else ["libpeer.so"]
    here = os.path.dirname(os.path.abspath(__file__))
    roots = []
    # A checkout or editable install: tools/python/peerlayer -> repository root.
    checkout = os.path.normpath(os.path.join(here, "..", "..", ".."))
    if os.path.exists(os.path.join(checkout, "include", "peer.h")):
        roots.append(checkout)
    try:
        from . import _install  # written by setup.py at install time
        roots.append(_install.REPO_ROOT)
    except ImportError:
        pass
    paths = [os.path.join(r, "build", "lib", n) for r in roots for n in names]
    found = ctypes.util.find_library("peer")
    if found:
        paths.append(found)
    return paths, False


class LibraryMismatch(OSError):
    """The libpeer found is not the one these declarations describe."""


def check_abi(lib, path):
    """Compare the library's version and struct sizes with the declarations
    above; raise LibraryMismatch naming every difference."""
    missing = [n for n in ("peer_version_number", "peer_struct_size") if not hasattr(lib, n)]
    if missing:
        raise LibraryMismatch(f"{path} lacks {', '.join(missing)}: it is older than this "
                              f"peerlayer (which needs libpeer {ABI_VERSION[0]}.{ABI_VERSION[1]})")
    lib.peer_version_number.restype, lib.peer_version_number.argtypes = ctypes.c_int, []
    lib.peer_struct_size.restype = ctypes.c_size_t
    lib.peer_struct_size.argtypes = [ctypes.c_char_p]
    number = lib.peer_version_number()
    major, minor = number // 10000, number // 100 % 100
    want_major, want_minor = ABI_VERSION
    ok = major == want_major and (minor == want_minor if major == 0 else minor >= want_minor)
    problems = []
    if not ok:
        problems.append(f"version {major}.{minor}.{number % 100}, this peerlayer needs "
                        f"{want_major}.{want_minor}" + (".x" if want_major == 0 else "+"))
    for name, cls in STRUCTS.items():
        theirs, ours = lib.peer_struct_size(name.encode()), ctypes.sizeof(cls)
        if theirs != ours:
            problems.append(f"sizeof({name}) is {theirs} there, {ours} here")
    if problems:
        raise LibraryMismatch(f"{path} does not match this peerlayer: " + "; ".join(problems) +
                              " (rebuild libpeer from the same checkout, or set PEER_LIBRARY)")


def load_library():
    paths, explicit = _candidates()
    errors = []
    for path in paths:
        if not explicit and os.path.sep in path and not os.path.exists(path):
            errors.append(f"{path}: not found")
            continue
        try:
            lib = ctypes.CDLL(path)
            check_abi(lib, path)
        except LibraryMismatch as e:
            if explicit:
                raise
            errors.append(str(e))
            continue
        except OSError as e:
            errors.append(f"{path}: {e}")
            continue
        for name, (res, args) in _PROTOTYPES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        lib.has_cuda = hasattr(lib, "peer_cuda_forward")
        if lib.has_cuda:
            for name, (res, args) in _CUDA_PROTOTYPES.items():
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = res, args
        lib.path = path
        return lib
    raise OSError(
        "peerlayer: cannot load libpeer (build it with cmake, or set PEER_LIBRARY "
        "to the path of libpeer.so); tried: " + "; ".join(errors or ["nothing"])
    )
