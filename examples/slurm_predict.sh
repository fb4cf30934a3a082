#!/bin/bash
# ldp-predict on 2 nodes x 8 GPUs under SLURM: srun starts one task per GPU, Lightning's SLURMEnvironment reads
# the task's rank, node and local rank (SLURM_PROCID, SLURM_NODEID, SLURM_LOCALID), the address of the first node
# of SLURM_NODELIST and a port derived from SLURM_JOB_ID (set MASTER_ADDR / MASTER_PORT to override them).
#
#   sbatch --gpus-per-node=8 examples/slurm_predict.sh                        # embedded digits DiT, USP 4 x 4
#   sbatch --gpus-per-node=8 examples/slurm_predict.sh model=pipeline model.path=/models/PixArt-Sigma-XL-2-1024-MS \
#       data=prompts data.file=prompts.txt model.torch_dtype=bfloat16 \
#       strategy.ulysses_degree=8 strategy.ring_degree=2                      # any ldp-predict override (README)
#   TRAINER=cpu sbatch --ntasks-per-node=2 examples/slurm_predict.sh strategy.ulysses_degree=2 \
#       strategy.ring_degree=2                                                # CPU processes (gloo)
#
# One task per device: --ntasks-per-node becomes trainer.devices (Lightning checks it, and --nodes = num_nodes).
# Ulysses groups stay inside a node when the Ulysses degree divides the tasks per node; ring (and pp, cfg, dp)
# cross nodes. Add +strategy.cross_node=error to refuse a layout whose Ulysses all-to-all would cross nodes.
#SBATCH --job-name=ldp-predict
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=00:30:00
#SBATCH --output=%x-%j.out

set -euo pipefail

TRAINER=${TRAINER:-gpu}
# One run directory for every node (on a shared file system); only global rank 0 writes into it.
RUN_DIR=${RUN_DIR:-outputs/slurm-${SLURM_JOB_ID}}

srun ldp-predict trainer="${TRAINER}" trainer.num_nodes="${SLURM_NNODES}" trainer.devices="${SLURM_NTASKS_PER_NODE}" \
    strategy=usp strategy.ulysses_degree=4 strategy.ring_degree=4 hydra.run.dir="${RUN_DIR}" "$@"
