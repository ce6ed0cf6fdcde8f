/** Opens a store in a fresh process and prints how long that took and the RSS after it (for bench/engine/chain.ts). */
import { BlockStore } from '../../storage-engine/index.js';

const dir = process.env.CBT_BENCH_STORE_DIR;
if (!dir) throw new Error('CBT_BENCH_STORE_DIR is not set');
const t0 = performance.now();
const store = BlockStore.open(dir, { autoCompact: false });
const openMs = performance.now() - t0;
const rssMB = process.memoryUsage().rss / 2 ** 20;
const layers = store.spaceUsage().layers;
await store.close();
process.stdout.write(`${JSON.stringify({ openMs, rssMB, layers })}\n`);
