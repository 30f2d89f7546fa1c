"""`python -m resfused`: versions, device, and which backends are available (and why not)."""

import platform

import torch

import resfused
from resfused import _backend


def main() -> None:
    print(f"resfused {resfused.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda})")
    try:
        import triton
        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(f"device: {props.name} (sm_{props.major}{props.minor}), cuDNN {torch.backends.cudnn.version()}")
    else:
        print("device: no CUDA device")
    print(f"TRITON_INTERPRET={'1' if _backend.triton_interpreted() else 'unset'}; "
          f"default backend: {resfused.get_backend()}")
    for b in resfused.backends():
        print(f"  {b.name:9s} {'available' if b.available else 'unavailable: ' + b.reason}")
    if _backend._cuda_ext_error() is None:
        from resfused.ops import conv_bias_act, conv_bn
        for op, why in (("conv_bias_act", conv_bias_act.cuda_op_reason()), ("conv_bn", conv_bn.cuda_op_reason())):
            print(f"  cuda {op}: {'built' if why is None else why}")


if __name__ == "__main__":
    main()
