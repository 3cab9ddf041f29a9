"""How the network computes where it runs: its precision, and whether XLA compiles it.

XLA's CPU backend does not use oneDNN's AVX-512 BF16 and AMX kernels, so on a CPU that has them
TensorFlow's plain graph is the faster path, by far; on an AVX2-only CPU XLA is. The instance
recipe's training step of 8 crops of 256x256 (docs/performance.md has the commands):
- AMD EPYC with AVX-512 BF16: 505 ms plain against 1278 ms XLA in bfloat16, 911 against 1292 ms
  in float32 (`bench.py --sections steps`, 2026-12-06);
- Intel Sapphire Rapids (AMX): 531 against 1669 ms in bfloat16 (issue 23's report);
- AMD EPYC with AVX2 only, float32: 3.9 s plain against 2.6 s XLA (an earlier session's).
Kinds not measured (an AVX-512 CPU without BF16, Arm) keep XLA, the path they had.
"""
from dataclasses import dataclass

JIT_CHOICES = ("auto", "on", "off")
PRECISIONS = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class Compute:
    """A path: `jit` as Keras' compile takes it (True, False, or "auto": XLA on GPUs only), the
    Keras dtype policy, and why they were chosen, in a few words."""
    jit: object
    policy: str
    why: str

    def describe(self):
        compiled = {True: "XLA", False: "plain graph", "auto": "Keras' auto"}[self.jit]
        return f"{self.policy}, {compiled}: {self.why}"


def cpu_has_bfloat16(cpuinfo="/proc/cpuinfo"):
    """Whether the CPU computes bfloat16 natively (x86's AVX-512 BF16 or AMX, Arm's BF16); where
    the flags cannot be read (not Linux), float32 is the safe guess."""
    try:
        with open(cpuinfo) as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def cpu_name(cpuinfo="/proc/cpuinfo"):
    """The CPU's model name and its AVX-512 and bfloat16 flags, as /proc/cpuinfo gives them
    (every timing is this CPU's); None where it cannot be read (not Linux)."""
    try:
        with open(cpuinfo) as f:
            text = f.read()
    except OSError:
        return None
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                  if line.startswith("model name")), "unknown model")
    flags = set(text.split())
    shown = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if flag in flags]
    return f"{model}, {' '.join(shown) or 'no AVX2'}"


def has_gpu():
    import tensorflow as tf

    return bool(tf.config.list_logical_devices("GPU"))


def choose_jit(setting, gpu, bfloat16):
    """(jit, why) for `--jit` auto|on|off on a device with or without a GPU and a bfloat16
    CPU."""
    if setting == "on":
        return True, "--jit on"
    if setting == "off":
        return False, "--jit off"
    if gpu:
        return "auto", "a GPU (Keras compiles with XLA there)"
    if bfloat16:
        return False, "this CPU's oneDNN kernels (AVX-512 BF16/AMX) beat XLA's CPU backend"
    return True, "a CPU without bfloat16 instructions, where XLA's step is the faster"


def training_compute(setting, mixed, notebook):
    """The training path: `mixed` asks for 16-bit compute (float16 on a GPU, bfloat16 on a CPU
    that has it); the notebook recipe keeps Keras' auto compilation under `--jit auto`, the
    path its README table was measured on."""
    gpu, bfloat16 = has_gpu(), cpu_has_bfloat16()
    policy, note = "float32", ""
    if mixed and gpu:
        policy = "mixed_float16"
    elif mixed and bfloat16:
        policy = "mixed_bfloat16"
    elif mixed:
        note = " (no bfloat16 instructions: emulated, a step took 40 times longer)"
    if notebook and setting == "auto":
        return Compute("auto", policy, "the notebook's path (Keras' auto: XLA on GPUs only)" + note)
    jit, why = choose_jit(setting, gpu, bfloat16)
    return Compute(jit, policy, why + note)


def prediction_compute(setting, precision="auto"):
    """The prediction path: `precision` auto is bfloat16 on a CPU that computes it natively
    (docs/performance.md: the same scores within 0.001, 0.6 times float32's time), float32
    elsewhere; float32 or bfloat16 force it."""
    gpu, bfloat16 = has_gpu(), cpu_has_bfloat16()
    jit, why = choose_jit(setting, gpu, bfloat16)
    if precision == "auto":
        precision = "bfloat16" if bfloat16 and not gpu else "float32"
    policy = {"float32": "float32", "bfloat16": "mixed_bfloat16"}[precision]
    return Compute(jit, policy, why)
