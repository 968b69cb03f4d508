# Sourced at the start of every device-tool call: install the carried wheels (the GPU image lacks the
# web stack and Ray), put the checkout on PYTHONPATH, and keep NVLink multicast off for every child.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
wheels=$(ls .whl/*.whl | grep -v "${SKIP_WHEELS:-^$}")
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels \
  && export PYTHONPATH=/tmp/site:$PWD
