/**
 * `cbt-csi generate`: applies a seeded pattern to a target and records the known answer. Targets are a
 * block device (writes, then BLKDISCARD through util-linux `blkdiscard` for trims) or a regular file
 * (writes, then punch-hole through util-linux `fallocate --punch-hole`: the range reads back as zeros and
 * the file keeps its size). The run is synced before its finish time is taken, so a snapshot cut after
 * that time holds all of it.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import { promisify } from 'node:util';
import { answerRun, type AnswerRun, type BlockStates } from './answers.js';
import { blockHashes, patternOps, zeroBlockHash, type PatternSpec } from './patterns.js';

const run = promisify(execFile);

/** Where a pattern is applied. */
export interface PatternTarget {
  readonly name: string;
  readonly capacityBytes: number;
  write(offset: number, data: Buffer): Promise<void>;
  /** Makes [offset, offset+length) read as zeros and count as discarded. */
  discard(offset: number, length: number): Promise<void>;
  /** Makes everything written so far durable on the target (and so visible to a snapshot). */
  sync(): Promise<void>;
  close(): Promise<void>;
}

/** Applies the pattern and returns its answer record (the caller appends it to the answers file). */
export async function generate(spec: Omit<PatternSpec, 'capacityBytes'>, target: PatternTarget): Promise<AnswerRun> {
  const { blockSize } = spec;
  const startedAtMs = Date.now();
  const states: BlockStates = new Map();
  for (const op of patternOps({ ...spec, capacityBytes: target.capacityBytes })) {
    if (op.kind === 'write') {
      await target.write(op.block * blockSize, op.data);
      const hashes = blockHashes(op.data, blockSize);
      for (let i = 0; i < op.blocks; i++) states.set(op.block + i, { sha256: hashes[i]!, trimmed: false });
    } else {
      await target.discard(op.block * blockSize, op.blocks * blockSize);
      for (let i = 0; i < op.blocks; i++) states.set(op.block + i, { sha256: zeroBlockHash(blockSize), trimmed: true });
    }
  }
  await target.sync();
  const finishedAtMs = Date.now();
  return answerRun(
    {
      pattern: spec.pattern,
      seed: spec.seed,
      count: spec.count,
      blockSize,
      target: target.name,
      capacityBytes: target.capacityBytes,
      startedAtMs,
      finishedAtMs,
    },
    states,
  );
}

/** A block device or regular file, opened for writing (never created: the target must exist). */
export async function openPathTarget(targetPath: string): Promise<PatternTarget> {
  const st = fs.statSync(targetPath);
  if (!st.isBlockDevice() && !st.isFile())
    throw new Error(`--target ${targetPath} is neither a block device nor a regular file`);
  const device = st.isBlockDevice();
  const capacityBytes = device ? Number((await run('blockdev', ['--getsize64', targetPath])).stdout.trim()) : st.size;
  const handle = await fs.promises.open(targetPath, 'r+');
  return {
    name: targetPath,
    capacityBytes,
    async write(offset, data) {
      let done = 0;
      while (done < data.length)
        done += (await handle.write(data, done, data.length - done, offset + done)).bytesWritten;
    },
    async discard(offset, length) {
      // Earlier buffered writes must reach the device before the discard, or they would land after it.
      await handle.sync();
      if (device) await run('blkdiscard', ['--offset', String(offset), '--length', String(length), targetPath]);
      else
        await run('fallocate', [
          '--punch-hole',
          '--keep-size',
          '--offset',
          String(offset),
          '--length',
          String(length),
          targetPath,
        ]);
    },
    async sync() {
      await handle.sync();
    },
    async close() {
      await handle.close();
    },
  };
}
