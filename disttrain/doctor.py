"""``disttrain doctor``: can this host train on its GPUs? From the versions to a short real job.

On a GPU host it checks, in order, and stops with exit code 1 and a message at the first failure:

1. TensorFlow (built with CUDA; its build CUDA/cuDNN), the GPUs it sees (name, compute capability) and the
   NVIDIA driver; the CUDA runtime, cuDNN and NCCL wheels against :mod:`disttrain.gpu_versions`.
2. Horovod: built with TensorFlow, its controllers, NCCL (``hvd.nccl_built()``), and NCCL loadable
   (``ncclGetVersion`` from the wheel's library).
3. Mirrored over all local GPUs ends with the same weights as one GPU within 1e-5 (float32, TF32 off).
4. ``horovodrun -np <GPUs>`` (NCCL): the same equivalence, one GPU per rank, and a 30-step throughput.
5. mixed_float16 with a ``LossScaleOptimizer`` on all GPUs (float16 compute, float32 variables, the loss falls).
6. A 30-step throughput (ResNet-50, synthetic 224x224 images, mixed_float16): images/s per GPU on one GPU and on
   all of them, and the scaling ratio (per-GPU rate on N GPUs / on one).

On a machine without a GPU it runs parts 1-3 on two logical CPU devices, says there is no GPU and exits 0.
``--simulate-gpus N`` runs the whole GPU flow on N logical CPU devices / N CPU ranks (Gloo) with a small model,
which is how the GPU flow itself is exercised on a CPU machine.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from disttrain import gpu_versions

TOLERANCE = 1e-5  # float32: N replicas against one device
HOROVOD_TIMEOUT = 900  # seconds for the horovodrun job (start-up, equivalence, throughput)


class DoctorError(RuntimeError):
    """A check failed; the message says what and how to fix it."""


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())


def _wheel(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nccl_library() -> str | None:
    """The pip NCCL library next to TensorFlow (site-packages/nvidia/nccl/lib/libnccl.so.2), if installed."""
    for root in sys.path:
        found = glob.glob(os.path.join(root, "nvidia", "nccl", "lib", "libnccl.so.*"))
        if found:
            return found[0]
    return None


def nccl_version(path: str) -> str:
    """Loads the NCCL library at ``path`` and asks it its version (no GPU needed).

    Raises:
      DoctorError: If it does not load or does not answer.
    """
    try:
        lib = ctypes.CDLL(path)
        code = ctypes.c_int()
        status = lib.ncclGetVersion(ctypes.byref(code))
    except (OSError, AttributeError) as err:
        raise DoctorError(f"NCCL at {path} does not load ({err}); reinstall nvidia-nccl-cu12=="
                          f"{gpu_versions.WHEELS['nvidia-nccl-cu12']}") from err
    if status != 0:
        raise DoctorError(f"ncclGetVersion of {path} returned {status}")
    major, rest = divmod(code.value, 10000)
    return f"{major}.{rest // 100}.{rest % 100}"


def _compare(weights: list, reference: list) -> float:
    """The largest difference relative to the reference's magnitude (at least 1)."""
    return max(float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b))))) for a, b in zip(weights, reference))


# -- the jobs (shared by this process and the horovodrun workers) -----------------------------------------------
def equivalence_weights(backend, *, global_batch: int) -> list:
    """Trains a small model with SGD for 16 steps (float32) and returns its final weights."""
    import keras
    import tensorflow as tf

    from disttrain.trainer import Trainer

    rng = np.random.default_rng(0)
    x = rng.normal(size=(global_batch * 8, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 1)) + 0.1 * rng.normal(size=(len(x), 1))).astype("float32")
    with backend.scope():
        keras.utils.set_random_seed(42)
        model = keras.Sequential([keras.Input(shape=(8,)), keras.layers.Dense(16, activation="tanh"),
                                  keras.layers.Dense(1)])
        optimizer = keras.optimizers.SGD(0.05)

    def step(ctx, batch):
        features, target = batch
        with tf.GradientTape() as tape:
            loss = ctx.average_loss(tf.reduce_mean(tf.square(target - model(features, training=True)), axis=-1))
        ctx.apply_gradients(optimizer, tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    Trainer(model=model, optimizer=optimizer, train_step=step, backend=backend, verbose=0).fit(
        tf.data.Dataset.from_tensor_slices((x, y)), global_batch_size=global_batch, epochs=2, shuffle_seed=3)
    return [v.numpy() for v in model.trainable_variables]


def mixed_precision(backend, *, global_batch: int) -> str:
    """mixed_float16 with a LossScaleOptimizer for 24 steps; checks the dtypes and that the loss falls."""
    import keras
    import tensorflow as tf

    from disttrain.trainer import Trainer

    rng = np.random.default_rng(1)
    x = rng.normal(size=(global_batch * 8, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 1))).astype("float32")
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        with backend.scope():
            keras.utils.set_random_seed(7)
            model = keras.Sequential([keras.Input(shape=(8,)), keras.layers.Dense(32, activation="relu"),
                                      keras.layers.Dense(1, dtype="float32")])
            optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.02))

        def step(ctx, batch):
            features, target = batch
            with tf.GradientTape() as tape:
                per_example = tf.reduce_mean(tf.square(target - model(features, training=True)), axis=-1)
                loss = ctx.average_loss(per_example)
                scaled = optimizer.scale_loss(loss)
            grads = tape.gradient(scaled, model.trainable_variables)
            ctx.apply_gradients(optimizer, grads, model.trainable_variables)
            return loss

        history = Trainer(model=model, optimizer=optimizer, train_step=step, backend=backend, verbose=0).fit(
            tf.data.Dataset.from_tensor_slices((x, y)), global_batch_size=global_batch, epochs=3, shuffle_seed=1)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    losses = history["loss"]
    compute, variables = model.layers[0].compute_dtype, {v.dtype for v in model.trainable_variables}
    if compute != "float16" or variables != {"float32"}:
        raise DoctorError(f"mixed_float16 computed in {compute} with {sorted(variables)} variables; expected float16 "
                          "compute and float32 variables")
    if not all(np.isfinite(losses)) or not losses[-1] < losses[0]:
        raise DoctorError(f"mixed_float16 training did not learn: loss per epoch {losses}")
    return f"loss {losses[0]:.4f} -> {losses[-1]:.4f}, loss scale {float(optimizer.dynamic_scale.numpy()):g}"


def throughput(backend, *, per_replica_batch: int, steps: int, small: bool) -> float:
    """Images per second (all replicas) over ``steps`` steps after a warm-up epoch: ResNet-50 on
    synthetic 224x224 images in mixed_float16, or (``small``) a small conv net on 32x32 images in float32."""
    import keras
    import tensorflow as tf

    from disttrain.callbacks import Callback
    from disttrain.trainer import Trainer

    size, classes = (32, 10) if small else (224, 1000)
    global_batch = per_replica_batch * backend.num_replicas
    keras.mixed_precision.set_global_policy("float32" if small else "mixed_float16")
    try:
        with backend.scope():
            keras.utils.set_random_seed(5)
            if small:
                model = keras.Sequential([keras.Input(shape=(size, size, 3)), keras.layers.Conv2D(8, 3, activation="relu"),
                                          keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(classes)])
            else:
                model = keras.applications.ResNet50(weights=None, input_shape=(size, size, 3), classes=classes,
                                                    classifier_activation=None)
            optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
            if not small:
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    finally:
        keras.mixed_precision.set_global_policy("float32")

    def step(ctx, batch):
        images, labels = batch
        with tf.GradientTape() as tape:
            logits = tf.cast(model(images, training=True), tf.float32)
            loss = ctx.average_loss(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))
            scaled = optimizer.scale_loss(loss) if hasattr(optimizer, "scale_loss") else loss
        ctx.apply_gradients(optimizer, tape.gradient(scaled, model.trainable_variables), model.trainable_variables)
        return loss

    class StepTimes(Callback):  # when each step of the second (compiled, warm) epoch ended
        def __init__(self):
            self.times = []

        def on_step_logs(self, trainer, step, logs):
            if step > steps + 1:
                self.times.append(time.perf_counter())

    image = tf.random.stateless_uniform((size, size, 3), seed=(1, 2))
    data = tf.data.Dataset.from_tensors((image, tf.constant(3, tf.int32))).repeat(global_batch * (steps + 1) * 2)
    timer = StepTimes()
    Trainer(model=model, optimizer=optimizer, train_step=step, backend=backend, verbose=0, callbacks=[timer],
            log_every_steps=1).fit(data, global_batch_size=global_batch, epochs=2, steps_per_epoch=steps + 1)
    return global_batch * (len(timer.times) - 1) / (timer.times[-1] - timer.times[0])


def horovod_worker(out: str, *, global_batch: int, per_replica_batch: int, steps: int, small: bool) -> None:
    """One rank of the doctor's horovodrun job; rank 0 writes ``weights.npz`` and ``info.json`` into ``out``."""
    from disttrain.backends import get_backend

    backend = get_backend("horovod")
    import horovod.tensorflow as hvd
    import tensorflow as tf

    tf.config.experimental.enable_tensor_float_32_execution(False)
    weights = equivalence_weights(backend, global_batch=global_batch)
    tf.config.experimental.enable_tensor_float_32_execution(True)
    rate = throughput(backend, per_replica_batch=per_replica_batch, steps=steps, small=small)
    info = {"size": backend.size, "nccl_built": bool(hvd.nccl_built()), "images_per_second": rate,
            "gpus_per_rank": len(tf.config.get_visible_devices("GPU"))}
    if backend.rank == 0:
        np.savez(os.path.join(out, "weights.npz"), *weights)
        with open(os.path.join(out, "info.json"), "w") as f:
            json.dump(info, f)


# -- the checks --------------------------------------------------------------------------------------------------
class Doctor:
    """Runs the checks in order, printing one line each; see the module docstring.

    Args:
      steps: Timed steps of each throughput figure.
      per_gpu_batch: Images per GPU per step of the throughput figures.
      simulate_gpus: Run the GPU flow on this many logical CPU devices / CPU ranks (0: the real GPUs).
      out: Where the report goes (default: standard output).
    """

    def __init__(self, *, steps: int = 30, per_gpu_batch: int = 64, simulate_gpus: int = 0, out=None):
        self.steps, self.per_gpu_batch, self.simulate, self.out = steps, per_gpu_batch, simulate_gpus, out
        self.gpus: list[str] = []
        self.hvd_nccl = False

    def say(self, text: str) -> None:
        print(text, file=self.out or sys.stdout, flush=True)

    def run(self) -> int:
        """Returns 0 when every check passed (or the CPU parts did, without a GPU), else 1."""
        checks = [("tensorflow", self.check_tensorflow), ("gpus", self.check_gpus),
                  ("cuda libraries", self.check_cuda_libraries), ("horovod", self.check_horovod),
                  ("nccl", self.check_nccl), ("mirrored = one device", self.check_mirrored)]
        gpu_checks = [("horovodrun + nccl = one device", self.check_horovodrun),
                      ("mixed_float16", self.check_mixed_precision), ("throughput", self.check_throughput)]
        for i, (name, check) in enumerate(checks + gpu_checks):
            if i == len(checks) and not self.replicas_are_gpus:
                self.say("no GPU: TensorFlow sees none here, so the GPU checks (horovodrun -np <GPUs> with NCCL, "
                         "mixed_float16, throughput) were not run; the CPU parts passed")
                return 0
            started = time.perf_counter()
            try:
                detail = check()
            except Exception as err:  # noqa: BLE001 - every failure is reported the same way
                self.say(f"FAIL  {name}: {err}")
                self.say(f"disttrain doctor: stopped at the first failure ({name}); see docs/gpu.md")
                return 1
            self.say(f"ok    {name}: {detail} [{time.perf_counter() - started:.1f} s]")
        self.say("disttrain doctor: every check passed")
        return 0

    @property
    def replicas_are_gpus(self) -> bool:
        return bool(self.gpus) or self.simulate > 0

    def _devices(self) -> list[str]:
        from disttrain.backends.devices import logical_cpus

        return self.gpus if self.gpus else logical_cpus(max(2, self.simulate))

    def check_tensorflow(self) -> str:
        import tensorflow as tf

        info = tf.sysconfig.get_build_info()
        if not tf.test.is_built_with_cuda():
            return f"{tf.__version__}, CPU build (no CUDA)"
        return f"{tf.__version__}, built with CUDA {info.get('cuda_version')} / cuDNN {info.get('cudnn_version')}"

    def check_gpus(self) -> str:
        import tensorflow as tf

        physical = tf.config.list_physical_devices("GPU")
        if self.simulate:
            if physical:
                raise DoctorError("--simulate-gpus is for machines without a GPU; this one has "
                                  f"{len(physical)}: run `disttrain doctor` without it")
            self._devices()  # split the CPU before TensorFlow starts
            return f"none; simulating {self.simulate} with logical CPU devices and CPU ranks"
        if not physical:
            self._devices()
            return "none (CPU only)"
        for gpu in physical:  # several processes share the GPUs: the horovodrun ranks beside this one
            tf.config.experimental.set_memory_growth(gpu, True)
        tf.config.experimental.enable_tensor_float_32_execution(False)
        lines, lowest = [], gpu_versions.CUDA_ARCHITECTURES.split(",")[0]
        for gpu in physical:
            details = tf.config.experimental.get_device_details(gpu)
            cc = details.get("compute_capability") or (0, 0)
            lines.append(f"{gpu.name} {details.get('device_name', '?')} (compute {cc[0]}.{cc[1]})")
            if cc[0] * 10 + cc[1] < int(lowest):
                raise DoctorError(f"{gpu.name} has compute capability {cc[0]}.{cc[1]}, below {int(lowest) / 10}, the "
                                  f"lowest Horovod's kernels are built for ({gpu_versions.CUDA_ARCHITECTURES}); rebuild "
                                  "with HOROVOD_BUILD_CUDA_CC_LIST including it")
        driver = self._driver()
        self.gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
        return f"{len(physical)}: " + "; ".join(lines) + f"; driver {driver}"

    def _driver(self) -> str:
        smi = shutil.which("nvidia-smi")
        if not smi:
            return "? (no nvidia-smi)"
        proc = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=60)
        driver = (proc.stdout.split() or ["?"])[0]
        if proc.returncode == 0 and _version_tuple(driver) < _version_tuple(gpu_versions.DRIVER_MINIMUM):
            raise DoctorError(f"NVIDIA driver {driver} is older than {gpu_versions.DRIVER_MINIMUM}, the oldest that "
                              f"runs CUDA 12; install {gpu_versions.DRIVER_RECOMMENDED} or newer")
        return driver

    def check_cuda_libraries(self) -> str:
        wanted = {name: gpu_versions.WHEELS[name] for name in
                  ("nvidia-cuda-runtime-cu12", "nvidia-cudnn-cu12", "nvidia-nccl-cu12")}
        found = {name: _wheel(name) for name in wanted}
        if not any(found.values()):
            if self.gpus:
                raise DoctorError("TensorFlow's CUDA wheels are not installed: pip install \"disttrain[gpu]\" "
                                  "(tensorflow[and-cuda]) with the pins of `python -m disttrain.gpu_versions`")
            return "none installed (CPU TensorFlow)"
        missing = [name for name, version in found.items() if not version]
        if missing and self.gpus:
            raise DoctorError(f"missing {', '.join(missing)}: pip install \"disttrain[gpu]\"")
        shown = ", ".join(f"{name.replace('nvidia-', '').replace('-cu12', '')} {found[name] or 'missing'}"
                          + ("" if found[name] in (None, version) else f" (tested: {version})")
                          for name, version in wanted.items())
        return shown

    def check_horovod(self) -> str:
        from disttrain.backends.devices import horovod_gpu_operations
        from disttrain.install import INSTALL_HINT

        try:
            import horovod.tensorflow as hvd
        except ImportError as err:
            raise DoctorError(f"Horovod with TensorFlow does not import ({err}); {INSTALL_HINT}"
                              + (" with --gpu" if self.gpus else "")) from err
        flags = {"tensorflow": True, "gloo": hvd.gloo_built(), "mpi": hvd.mpi_built(), "nccl": hvd.nccl_built()}
        self.hvd_nccl = bool(flags["nccl"])
        shown = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in flags.items())
        ops, warning = horovod_gpu_operations(num_gpus=len(self.gpus), nccl_built=self.hvd_nccl)
        if warning:
            raise DoctorError(f"{warning} ({shown})")
        return f"{importlib.metadata.version('horovod')} ({shown}); GPU tensors: {ops}"

    def check_nccl(self) -> str:
        path = _nccl_library()
        if path is None:
            if self.gpus:
                raise DoctorError("no NCCL library (nvidia-nccl-cu12) beside TensorFlow: pip install \"disttrain[gpu]\"")
            return "not installed (CPU TensorFlow)"
        return f"{nccl_version(path)} loads from {path}"

    def check_mirrored(self) -> str:
        from disttrain.backends.devices import mirrored_cross_device_ops
        from disttrain.backends.mirrored import MirroredBackend
        from disttrain.backends.single import SingleBackend

        devices = self._devices()
        self.global_batch = 16 * len(devices)
        self.reference = equivalence_weights(SingleBackend(device=devices[0]), global_batch=self.global_batch)
        mirrored = MirroredBackend(devices=devices)
        self.mirrored = mirrored
        diff = _compare(equivalence_weights(mirrored, global_batch=self.global_batch), self.reference)
        if not diff <= TOLERANCE:
            raise DoctorError(f"Mirrored over {len(devices)} devices ends {diff:.2e} away from one device (> {TOLERANCE})")
        cross = type(mirrored_cross_device_ops(devices)).__name__  # the backend's own choice
        return f"{len(devices)} replicas ({cross}), largest relative difference {diff:.1e} <= {TOLERANCE}"

    def check_horovodrun(self) -> str:
        horovodrun = shutil.which("horovodrun") or os.path.join(os.path.dirname(sys.executable), "horovodrun")
        if not os.path.exists(horovodrun):
            raise DoctorError("horovodrun is not on PATH: install Horovod (disttrain install-horovod --gpu)")
        n = len(self._devices())
        with tempfile.TemporaryDirectory(prefix="disttrain-doctor-") as out:
            code = (f"from disttrain.doctor import horovod_worker; horovod_worker({out!r}, global_batch={self.global_batch}, "
                    f"per_replica_batch={self.per_gpu_batch}, steps={self.steps}, small={bool(self.simulate)})")
            command = [horovodrun, "-np", str(n), "-H", f"localhost:{n}", sys.executable, "-c", code]
            env = dict(os.environ)
            env.pop("DISTTRAIN_CPU_REPLICAS", None)
            try:
                proc = subprocess.run(command, capture_output=True, text=True, timeout=HOROVOD_TIMEOUT, env=env)
            except subprocess.TimeoutExpired as err:
                raise DoctorError(f"{' '.join(command[:5])} ... did not finish in {HOROVOD_TIMEOUT} s") from err
            if proc.returncode != 0 or not os.path.exists(os.path.join(out, "info.json")):
                tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
                raise DoctorError(f"{' '.join(command[:5])} ... exited {proc.returncode}:\n{tail}")
            with open(os.path.join(out, "info.json")) as f:
                info = json.load(f)
            with np.load(os.path.join(out, "weights.npz")) as saved:
                weights = [saved[f"arr_{i}"] for i in range(len(saved.files))]
        if not self.simulate and (not info["nccl_built"] or info["gpus_per_rank"] != 1):
            raise DoctorError(f"the horovodrun ranks ran with nccl_built={info['nccl_built']} and "
                              f"{info['gpus_per_rank']} GPUs each; expected NCCL and one GPU per rank")
        diff = _compare(weights, self.reference)
        if not diff <= TOLERANCE:
            raise DoctorError(f"horovodrun -np {n} ends {diff:.2e} away from one device (> {TOLERANCE})")
        self.horovod_rate = info["images_per_second"]
        return (f"-np {n}, {'Gloo (simulated)' if self.simulate else 'NCCL'}, largest relative difference {diff:.1e}; "
                f"{info['images_per_second'] / n:.1f} images/s per {'rank' if self.simulate else 'GPU'}")

    def check_mixed_precision(self) -> str:
        return mixed_precision(self.mirrored, global_batch=self.global_batch)

    def check_throughput(self) -> str:
        import tensorflow as tf

        from disttrain.backends.single import SingleBackend

        tf.config.experimental.enable_tensor_float_32_execution(True)
        small, devices = bool(self.simulate), self._devices()
        one = throughput(SingleBackend(device=devices[0]), per_replica_batch=self.per_gpu_batch, steps=self.steps,
                         small=small)
        many = throughput(self.mirrored, per_replica_batch=self.per_gpu_batch, steps=self.steps, small=small)
        n = len(devices)
        model = "small conv net 32x32 (simulated)" if small else "ResNet-50 224x224 mixed_float16"
        return (f"{model}, {self.per_gpu_batch} images per GPU, {self.steps} steps: 1 GPU {one:.1f} images/s; "
                f"Mirrored {n} GPUs {many / n:.1f} images/s per GPU (scaling {many / n / one:.2f}); "
                f"horovodrun {self.horovod_rate / n:.1f} images/s per GPU (scaling {self.horovod_rate / n / one:.2f})")
