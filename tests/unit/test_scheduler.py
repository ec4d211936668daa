"""Scheduler policy on a real block manager and no model: budget, chunking, preemption, abort."""

from app.engine.block_manager import BlockManager
from app.engine.scheduler import Scheduler, SeqStatus, Sequence


def make(num_blocks=64, block_size=4, max_num_seqs=8, budget=32):
    bm = BlockManager(num_blocks, block_size)
    return bm, Scheduler(bm, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)


def run_step(sched: Scheduler, next_token=7):
    out = sched.schedule()
    sched.update(out)
    for item in out.scheduled:
        if item.sample:
            item.seq.token_ids.append(next_token)
    return out


def test_long_prompt_is_prefilled_in_chunks_within_the_budget():
    _, sched = make(budget=16)
    seq = Sequence("a", list(range(40)), max_tokens=4)
    sched.add(seq)
    sizes = []
    for _ in range(3):
        out = run_step(sched)
        sizes.append(out.scheduled[0].num_new_tokens)
        assert out.num_tokens <= 16
    assert sizes == [16, 16, 8]
    assert seq.num_output_tokens == 1  # sampled only when the whole prompt was computed


def test_decode_is_not_starved_by_a_long_prompt():
    _, sched = make(budget=16)
    short = Sequence("short", [1, 2, 3], max_tokens=10)
    sched.add(short)
    run_step(sched)
    sched.add(Sequence("long", list(range(100)), max_tokens=4))
    out = run_step(sched)
    by_id = {i.seq.seq_id: i.num_new_tokens for i in out.scheduled}
    assert by_id["short"] == 1 and by_id["long"] == 15


def test_max_num_seqs_bounds_the_running_batch():
    _, sched = make(max_num_seqs=2, budget=100)
    for i in range(4):
        sched.add(Sequence(str(i), [1, 2, 3], max_tokens=4))
    out = run_step(sched)
    assert len(out.scheduled) == 2 and len(sched.waiting) == 2


def test_preemption_when_blocks_run_out_requeues_the_newest_first():
    bm, sched = make(num_blocks=4, block_size=4, budget=100)
    a = Sequence("a", list(range(7)), max_tokens=20)
    b = Sequence("b", list(range(10, 17)), max_tokens=20)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # both hold 2 blocks (7 prompt tokens)
    preempted = []
    for _ in range(4):
        out = run_step(sched)
        preempted += out.preempted
    assert preempted and preempted[0] is b
    assert sched.num_preemptions >= 1
    assert b.status is SeqStatus.WAITING or b.status is SeqStatus.RUNNING
    # b keeps what it generated: on recompute its prompt includes its outputs.
    assert b.num_tokens >= 8
    assert bm.usage() <= 1.0


def test_finish_frees_blocks_from_running_and_waiting():
    bm, sched = make()
    a = Sequence("a", [1, 2, 3, 4, 5], max_tokens=4)
    b = Sequence("b", [1, 2, 3], max_tokens=4)
    sched.add(a)
    run_step(sched)
    sched.add(b)
    sched.finish(a)
    sched.finish(b)
    assert bm.usage() == 0.0 and not sched.has_work()


def test_siblings_wait_for_the_leader_prefill_and_share_its_blocks():
    bm, sched = make(budget=100)
    prompt = list(range(20))
    leader = Sequence("r#0", prompt, max_tokens=4)
    child = Sequence("r#1", prompt, max_tokens=4, leader=leader)
    sched.add(leader)
    sched.add(child)
    out = run_step(sched)
    assert [i.seq.seq_id for i in out.scheduled] == ["r#0"]
    out = run_step(sched)
    child_item = next(i for i in out.scheduled if i.seq is child)
    assert child_item.num_new_tokens == 4  # 16 of 20 prompt tokens came from the leader's blocks
    assert child.block_table[:4] == leader.block_table[:4]
