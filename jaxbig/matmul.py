"""Matmuls with float32 accumulation and output whatever the operands' dtype.

XLA:CPU has no float16 x float16 -> float32 matmul, so float16 operands are upcast when the
step is compiled for CPUs. The platform context (`compiling_for`) only decides that upcast,
which is exact (float16 products are exact in float32), so it does not change numerics.
"""

import contextlib
import contextvars

import jax
import jax.numpy as jnp

_PLATFORM: contextvars.ContextVar = contextvars.ContextVar('platform', default=None)


@contextlib.contextmanager
def compiling_for(mesh: jax.sharding.Mesh):
  """Within this context `platform()` is that of `mesh`'s devices ('cpu', 'gpu', 'tpu'): the
  devices a step is traced for, which an ahead-of-time TPU plan on a CPU host does not run on."""
  token = _PLATFORM.set(mesh.devices.flat[0].platform)
  try:
    yield
  finally:
    _PLATFORM.reset(token)


def platform() -> str:
  """The platform the model is traced for: `compiling_for`'s, else JAX's default backend.
  Only the float16 upcast asks; the fast paths are chosen by the kernel policy
  (jaxbig/kernels), never by this."""
  return _PLATFORM.get() or jax.default_backend()


def upcast_f16_on_cpu(*xs: jax.Array) -> tuple:
  """float16 operands upcast to float32 on CPU; elsewhere (and for every other dtype) the
  operands as they are."""
  if xs[0].dtype == jnp.float16 and platform() == 'cpu':
    return tuple(x.astype(jnp.float32) for x in xs)
  return xs


def dot_general_f32(lhs, rhs, dimension_numbers, precision=None, **kwargs) -> jax.Array:
  """`lax.dot_general` in the operands' dtype with float32 accumulation and output."""
  lhs, rhs = upcast_f16_on_cpu(lhs, rhs)
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=jnp.float32, **kwargs)


def einsum_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """`jnp.einsum` of two operands with float32 accumulation and output."""
  a, b = upcast_f16_on_cpu(a, b)
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
