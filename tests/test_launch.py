from launch.env import detect


def test_single_process_when_no_launcher_variables():
    env = detect({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single") and env.master_port > 0


def test_torchrun_and_accelerate_variables():
    base = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "node0", "MASTER_PORT": "1234"}
    env = detect(base)
    assert (env.rank, env.local_rank, env.world_size, env.master_addr, env.master_port, env.launcher) == \
        (3, 1, 4, "node0", 1234, "torchrun")
    assert detect({**base, "ACCELERATE_USE_DEEPSPEED": "true"}).launcher == "accelerate"


def test_slurm_srun_one_task_per_process_for_n_nodes():
    # 2 nodes x 4 tasks: global rank from SLURM_PROCID, device from SLURM_LOCALID
    for node in range(2):
        for local in range(4):
            env = detect({"SLURM_PROCID": str(node * 4 + local), "SLURM_LOCALID": str(local), "SLURM_NTASKS": "8",
                          "SLURM_STEP_NUM_TASKS": "8", "MASTER_ADDR": "n0", "MASTER_PORT": "29500"})
            assert (env.rank, env.local_rank, env.world_size, env.launcher) == (node * 4 + local, local, 8, "slurm")
    # a one-task allocation is a single process, whatever Slurm says
    assert detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1"}).launcher == "single"
