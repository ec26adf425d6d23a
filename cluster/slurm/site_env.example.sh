# Site settings for cluster/slurm/train.sbatch: copy to cluster/slurm/site_env.sh and edit.
# Sourced by the batch script before the launch; the S3/NCCL/HF variables set here are written
# to .deepspeed_env (python -m bdt.cluster.hosts ds-env) and so reach every node. No secrets
# here: nodes get S3 credentials from an instance role or a shared ~/.aws (AWS_PROFILE).

# S3: region, and an endpoint for a non-AWS store (MinIO, Ceph, ...).
export AWS_DEFAULT_REGION=us-east-1
# export AWS_ENDPOINT_URL_S3=https://s3.example.internal
# export AWS_PROFILE=bdt

# NCCL over InfiniBand / EFA: name the interfaces of your fabric.
export NCCL_SOCKET_IFNAME=^lo,docker
export NCCL_IB_DISABLE=0
# export NCCL_IB_HCA=mlx5
# export FI_PROVIDER=efa              # AWS EFA (with the aws-ofi-nccl plugin)
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1  # a dead peer ends the step instead of hanging it
export NCCL_DEBUG=WARN

# Offline nodes: never reach a model hub.
export HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
