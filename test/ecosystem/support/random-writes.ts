/**
 * Seeded random writes through a block device, as a pod's application makes them: sector-aligned, mostly
 * partial blocks, each a dd with O_DIRECT and fsync through the driver's FUSE server. Returns the blocks
 * they touched: what the driver's changed block tracking must name, exactly.
 */
import { randomBytes } from 'node:crypto';
import { directWrite } from '../../e2e/support/node-env.js';

export interface RandomWrites {
  /** Bytes of the device the writes may reach. */
  capacity: number;
  /** The volume's block size: what a touched block is. */
  blockSize: number;
  /** A scratch file for dd. */
  scratch: string;
  /** The device's expected content, updated with every write. */
  model?: Buffer;
  /** Blocks half of the writes land on again (rewrites); the other half go anywhere. */
  rewriteOf?: ReadonlySet<number>;
}

export function writeRandomly(device: string, random: () => number, count: number, o: RandomWrites): Set<number> {
  const touched = new Set<number>();
  const rewritable = o.rewriteOf ? [...o.rewriteOf] : [];
  for (let i = 0; i < count; i++) {
    const sectors = random() < 0.8 ? 1 + Math.floor(random() * 16) : 1 + Math.floor(random() * 128);
    const length = sectors * 512;
    const offset =
      rewritable.length > 0 && i % 2 === 0
        ? Math.min(rewritable[Math.floor(random() * rewritable.length)]! * o.blockSize, o.capacity - length)
        : Math.floor(random() * ((o.capacity - length) / 512)) * 512;
    const bytes = randomBytes(length);
    directWrite(device, offset, bytes, o.scratch);
    if (o.model) bytes.copy(o.model, offset);
    const first = Math.floor(offset / o.blockSize);
    for (let b = first; b <= Math.floor((offset + length - 1) / o.blockSize); b++) touched.add(b);
  }
  return touched;
}
