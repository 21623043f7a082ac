"""The router-worker tensor path is chosen from where each side keeps its tensors (pure; CUDA IPC itself: tests/gpu)."""

import pytest
import torch

from moefleet.core.cuda_ipc import CudaTensorHandle, export_tensor, open_tensor
from moefleet.router_service.gpu_transport import CUDA_IPC, ROWS, SHARED_MEMORY, Endpoint, choose_transport, local_endpoint

A, B = "GPU-aaaa", "GPU-bbbb"


@pytest.mark.parametrize(
    ("router", "worker", "want", "reason"),
    [
        (Endpoint("n1", A, (A,)), Endpoint("n1", A, (A,)), CUDA_IPC, "same node"),
        (Endpoint("n1", A, (A, B)), Endpoint("n1", B, (A, B)), CUDA_IPC, "same node"),
        (Endpoint("n1", A, (A,)), Endpoint("n1"), SHARED_MEMORY, "worker keeps its tensors on the CPU"),
        (Endpoint("n1"), Endpoint("n1", A, (A,)), SHARED_MEMORY, "router keeps its tensors on the CPU"),
        (Endpoint("n1"), Endpoint("n1"), SHARED_MEMORY, "router keeps its tensors on the CPU"),
        (Endpoint("n1", A, (A,)), Endpoint("n2", A, (A,)), ROWS, "different nodes"),
        (Endpoint("n1"), Endpoint("n2"), ROWS, "only the worker's rows cross the network"),
        (Endpoint("n1", A, (A,)), Endpoint("n1", B, (B,)), SHARED_MEMORY, "cannot see each other's GPU"),
        (Endpoint("n1", A, (A, B)), Endpoint("n1", B, (B,)), SHARED_MEMORY, "cannot see each other's GPU"),
    ],
)
def test_transport_is_cuda_ipc_for_mutually_visible_gpus_shared_memory_on_a_node_rows_between_nodes(router, worker, want, reason):
    got, why = choose_transport(router, worker)
    assert got == want and reason in why


def test_cpu_process_is_a_cpu_endpoint():
    assert local_endpoint("n1", "cpu") == Endpoint("n1")
    assert choose_transport(local_endpoint("n1", "cpu"), local_endpoint("n1", "cpu"))[0] == SHARED_MEMORY


def test_exporting_a_cpu_tensor_or_opening_a_non_handle_is_a_value_error():
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        export_tensor(torch.zeros(3))
    with pytest.raises(ValueError, match="needs a CudaTensorHandle"):
        open_tensor(b"not a handle")
    foreign = CudaTensorHandle(gpu="GPU-not-here", shape=(3,), dtype=torch.float32, nbytes=12, _rebuild_args=())
    with pytest.raises(ValueError, match="GPU-not-here holding the tensor is not visible in this process"):
        open_tensor(foreign)
