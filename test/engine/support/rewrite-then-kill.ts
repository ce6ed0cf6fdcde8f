/**
 * Child process of deleted-base.test.ts: leaves a deleted snapshot's layer merged into the live head, rewrites
 * one of the blocks that merge brought in, and SIGKILLs itself before any flush. The rewrite's bytes land in
 * place, over a block whose bit the merge already committed, so they survive the kill (the page cache does).
 *
 * Run as `node --import tsx rewrite-then-kill.ts <store-dir>`; prints `{"volumeId","deletedId"}` first.
 */
import { BlockStore } from '../../../storage-engine/index.js';

const B = 4096;
const store = BlockStore.open(process.argv[2]!, { autoCompact: false });
const v = await store.createVolume({ capacityBytes: 64 * B });
store.write(v.id, 0, Buffer.alloc(2 * B, 1));
const s = await store.createSnapshot({ volumeId: v.id });
// The snapshot's layer is right under the live head: deleting it and compacting merges it into the head,
// which now holds blocks 0 and 1 as brought in (not changed since s).
await store.deleteSnapshot(s.id);
if ((await store.compact()).merged !== 1) throw new Error('expected one merge into the live head');
process.stdout.write(`${JSON.stringify({ volumeId: v.id, deletedId: s.id })}\n`);
store.write(v.id, 0, Buffer.alloc(B, 9));
process.kill(process.pid, 'SIGKILL');
