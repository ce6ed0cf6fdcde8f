/** Child process for ownership tests: opens the store at argv[2], says "ready", then waits to be killed. */
import { BlockStore } from '../../../storage-engine/index.js';

const store = BlockStore.open(process.argv[2]!, { autoCompact: false });
await store.createVolume({ name: 'held', capacityBytes: 1 << 20 });
process.stdout.write('ready\n');
setInterval(() => undefined, 1 << 30);
