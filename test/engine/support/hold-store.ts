/** Child process for ownership tests: opens the store at argv[2], says "ready pid=<its own PID>", then waits to be killed. */
import { BlockStore } from '../../../storage-engine/index.js';

const store = BlockStore.open(process.argv[2]!, { autoCompact: false });
if (!store.findVolumeByName('held')) await store.createVolume({ name: 'held', capacityBytes: 1 << 20 });
process.stdout.write(`ready pid=${process.pid}\n`);
setInterval(() => undefined, 1 << 30);
