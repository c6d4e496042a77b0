"""Checkpointer: round trip, keep-N, and a kill -9 in the middle of a save."""
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np

from searchr1_jax.checkpoint import Checkpointer


def _items(scale):
    return {"policy": {"w": jnp.full((4, 3), scale, jnp.float32)},
            "train_state": {"opt": {"mu": jnp.arange(5.0) * scale}, "rng": jnp.array([1, 2], jnp.uint32)}}


def test_round_trip_and_keep_last_n(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt", keep=2, async_save=True)
    for step in (1, 2, 3):
        ckpt.save(step, _items(float(step)), {"step": step, "data": {"epoch": 0, "position": step}})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3]
    items, record = ckpt.restore(None, _items(0.0))
    assert record["data"]["position"] == 3
    np.testing.assert_array_equal(items["policy"]["w"], np.full((4, 3), 3.0))
    np.testing.assert_array_equal(items["train_state"]["opt"]["mu"], np.arange(5.0) * 3)
    only_policy, _ = ckpt.restore(2, {"policy": _items(0.0)["policy"]})
    np.testing.assert_array_equal(only_policy["policy"]["w"], np.full((4, 3), 2.0))
    ckpt.close()


def test_kill_during_save_leaves_previous_checkpoint(tmp_path):
    """A process killed while writing step 2 must leave step 1 as the latest, intact."""
    script = textwrap.dedent(f"""
        import os, signal, time
        import jax.numpy as jnp
        from searchr1_jax.checkpoint import Checkpointer
        ckpt = Checkpointer({str(tmp_path / 'ckpt')!r}, keep=3)
        small = {{"policy": {{"w": jnp.ones((8,), jnp.float32)}}, "train_state": {{"x": jnp.zeros(3)}}}}
        ckpt.save(1, small, {{"step": 1}})
        ckpt.wait()
        big = {{"policy": {{"w": jnp.ones((64, 1024, 1024), jnp.float32)}}, "train_state": {{"x": jnp.ones(3)}}}}
        ckpt.save(2, big, {{"step": 2}})
        time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == -9
    leftovers = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert any(name.startswith("2.") and "tmp" in name for name in leftovers), \
        f"the kill did not land during the save of step 2: {leftovers}"
    ckpt = Checkpointer(tmp_path / "ckpt")
    assert ckpt.latest_step() == 1
    items, record = ckpt.restore(None, {"policy": {"w": jnp.zeros((8,), jnp.float32)},
                                        "train_state": {"x": jnp.zeros(3)}})
    assert record["step"] == 1
    np.testing.assert_array_equal(items["policy"]["w"], np.ones(8))
    ckpt.close()
