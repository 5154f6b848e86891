# Every task finds the same rendezvous: the job's first node, and a port derived from the job id.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
export MASTER_PORT=$((15000 + SLURM_JOB_ID % 20000))
# One thread per CPU of a task; srun (SLURM 22.05 on) does not inherit sbatch's --cpus-per-task.
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi
export PYTHONUNBUFFERED=1

echo "infinitrain: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST at $(date -Is)"
# SIGUSR1 ({{ signal_seconds }} s before the time limit, or `scancel --signal=USR1`) makes the trainer save
# a checkpoint and requeue this job; the rerun (and any re-submission) continues from the run's
# newest checkpoint with --resume auto, which starts fresh when there is none yet.
srun --kill-on-bad-exit=1 {{ command }}
