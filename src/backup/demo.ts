/**
 * `cbt-csi demo`: a newcomer's first five minutes against a running driver. It creates a volume, writes a
 * known pattern through its published block device (as a pod would), snapshots, writes again, snapshots,
 * prints the delta beside what was written, draws the block map, backs both snapshots up, restores the
 * second into an image file and compares it with the volume, and removes everything it made but the picture.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { connectCsiDirect, type Extent } from '../client/index.js';
import { openSource } from './block-target.js';
import { renderBlockmap } from './blockmap.js';
import { planBackup, writeBackup } from './backup-run.js';
import { BLOCK_CAPABILITY, CsiVolumes, requireRoot, unreachable } from './csi-volumes.js';
import { writeFileDurably } from './durable-files.js';
import { createProgress } from './progress.js';
import { BackupRepository } from './repository.js';
import { restoreBackup } from './restore.js';
import { formatBytes } from './units.js';

const MiB = 2 ** 20;
const KiB = 1024;
const CAPACITY = 64 * MiB;

/** What the demo writes: before the first snapshot, and between the two. */
const FIRST: Extent[] = [
  { offset: 0, length: 1 * MiB },
  { offset: 16 * MiB, length: 64 * KiB },
  { offset: 40 * MiB, length: 4 * KiB },
];
const SECOND: Extent[] = [
  { offset: 8 * MiB, length: 4 * KiB },
  { offset: 16 * MiB + 32 * KiB, length: 8 * KiB },
  { offset: 50 * MiB + 512, length: 1024 },
  { offset: 60 * MiB, length: 256 * KiB },
];

export interface DemoOptions {
  endpoint: string;
  out: string;
  signal: AbortSignal;
  print(line: string): void;
}

export async function runDemo({ endpoint, out, signal, print }: DemoOptions): Promise<void> {
  requireRoot('the demo', 'or read docs/quickstart-local.md for what works without root');
  const volumes = new CsiVolumes(endpoint);
  const client = connectCsiDirect(endpoint);
  const cleanup: (() => Promise<unknown>)[] = [];
  const work = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'cbt-demo-'));
  cleanup.push(() => fs.promises.rm(work, { recursive: true, force: true }));
  try {
    const name = `cbt-demo-${randomBytes(4).toString('hex')}`;
    const created = await volumes.controller
      .createVolume(
        {
          name,
          capacityRange: { requiredBytes: BigInt(CAPACITY) },
          volumeCapabilities: [BLOCK_CAPABILITY],
          parameters: { blockSize: '4096' },
        },
        { signal },
      )
      .catch((err: unknown) => {
        throw unreachable(err, endpoint);
      });
    const volumeId = created.volume!.volumeId;
    cleanup.push(() => volumes.controller.deleteVolume({ volumeId }));
    print(`1. created volume ${volumeId} (${formatBytes(CAPACITY)}), 4 KiB blocks`);
    const published = await volumes.publish(volumeId, signal);
    cleanup.push(() => published.release());
    print(`2. staged and published it as a block device: ${published.device}`);

    writePattern(published.device, FIRST, 1);
    print(`3. wrote ${describe(FIRST)}`);
    const snap1 = await snapshot(volumes, volumeId, `${name}-1`, cleanup);
    print(`4. snapshot ${snap1}`);
    writePattern(published.device, SECOND, 2);
    print(`5. wrote ${describe(SECOND)}`);
    const snap2 = await snapshot(volumes, volumeId, `${name}-2`, cleanup);
    print(`6. snapshot ${snap2}`);

    const listing = await client.delta(snap1, snap2, { signal });
    const delta: Extent[] = [];
    for await (const e of listing) delta.push(e);
    print(`7. GetMetadataDelta(${snap1}, ${snap2}), ${listing.blockMetadataType}: ${delta.length} changed extents`);
    print(`   ${'written (bytes)'.padEnd(34)} changed extent reported (whole 4 KiB blocks)`);
    const rows = Math.max(delta.length, SECOND.length);
    for (let i = 0; i < rows; i++) {
      const w = SECOND[i] ? `${SECOND[i]!.offset} +${SECOND[i]!.length}` : '';
      const d = delta[i] ? `${delta[i]!.offset} +${delta[i]!.length}` : '';
      print(`   ${w.padEnd(34)} ${d}`);
    }

    const allocated = await client.allocated(snap1, { signal });
    const first: Extent[] = [];
    for await (const e of allocated) first.push(e);
    // Renamed into place: a symlink planted at `out` is replaced, not written through.
    await writeFileDurably(
      out,
      renderBlockmap(
        [
          { label: snap1, note: 'allocated', capacityBytes: CAPACITY, extents: first },
          { label: snap2, note: 'changed since the row above', capacityBytes: CAPACITY, extents: delta },
        ],
        'cbt-csi demo: what each snapshot holds or changed',
      ),
      undefined,
      0o644,
    );
    print(`8. block map: ${out}`);

    const repoDir = path.join(work, 'repo');
    const repo = await BackupRepository.openOrCreate(repoDir);
    const ids: string[] = [];
    for (const snap of [snap1, snap2]) {
      const facts = await volumes.snapshot(snap);
      const base = ids.length ? await repo.manifest(ids.at(-1)!) : null;
      const plan = await planBackup(client, snap, facts.sourceVolume, base, signal);
      const exposed = await volumes.expose(facts, signal);
      const lock = await repo.lock();
      try {
        const source = await openSource(exposed.device, plan.capacityBytes);
        try {
          const summary = await writeBackup(repo, lock, plan, source, createProgress('quiet'), signal);
          ids.push(summary.id);
          print(
            `9. backup ${summary.id}: ${summary.kind}, read ${formatBytes(summary.bytesRead)} of ${formatBytes(CAPACITY)}`,
          );
        } finally {
          await source.close();
        }
      } finally {
        await lock.release();
        await exposed.release();
      }
    }
    const image = path.join(work, 'restored.img');
    const restored = await restoreBackup(repo, ids.at(-1)!, image, createProgress('quiet'));
    const live = fs.readFileSync(published.device).subarray(0, CAPACITY);
    const same = fs.readFileSync(image).equals(live);
    print(
      `10. restored ${ids.at(-1)} (chain of ${restored.chain.length}) into an image: ${same ? 'identical to the volume, byte for byte' : 'DIFFERENT from the volume'}`,
    );
    if (!same) throw new Error('the restored image differs from the volume');
  } finally {
    const errors: unknown[] = [];
    for (const step of cleanup.reverse()) await step().catch((err: unknown) => errors.push(err));
    await client.close();
    volumes.close();
    print(
      errors.length
        ? `cleanup left something behind: ${String(errors[0])}`
        : '11. cleaned up: snapshots, volume, device, repository and image removed',
    );
  }
}

async function snapshot(
  volumes: CsiVolumes,
  volumeId: string,
  name: string,
  cleanup: (() => Promise<unknown>)[],
): Promise<string> {
  const res = await volumes.controller.createSnapshot({ sourceVolumeId: volumeId, name });
  const id = res.snapshot!.snapshotId;
  cleanup.push(() => volumes.controller.deleteSnapshot({ snapshotId: id }));
  return id;
}

/** Writes each extent filled with a recognisable byte (the phase number and the extent's index). */
function writePattern(device: string, extents: readonly Extent[], phase: number): void {
  const fd = fs.openSync(device, 'r+');
  try {
    for (const [i, e] of extents.entries())
      fs.writeSync(fd, Buffer.alloc(e.length, phase * 16 + i + 1), 0, e.length, e.offset);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

function describe(extents: readonly Extent[]): string {
  return extents.map((e) => `${formatBytes(e.length)} at byte ${e.offset}`).join(', ');
}
