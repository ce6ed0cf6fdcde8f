/**
 * Backup and restore end to end, CSI direct, the loop a backup vendor builds: a volume written with seeded
 * random data (block-aligned and byte-unaligned writes, rewrites, trims), snapshotted after each phase;
 * `cbt-csi backup` takes a full backup, then incrementals on the previous backup (reading through a volume
 * it creates from the snapshot and publishes through the Node service); every backup restored with
 * `cbt-csi restore` into a fresh file equals its snapshot byte for byte, read through a volume created
 * from that snapshot. Deleting a middle snapshot does not break later incrementals, which are based on
 * backups, not snapshots.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { mulberry32 } from '../support/random.js';
import { connectCsiDirect } from '../../src/client/index.js';
import { MiB, dataPlaneSuite, sh, startNodeEnv, type NodeEnv } from '../e2e/support/node-env.js';
import { jsonOf, runCli } from './support/cli.js';
import { createVolume, looserThanPrivate, publish, snapshot, snapshotBytes } from './support/volumes.js';

const CAPACITY = 32 * MiB;
const BLOCK = 4096;
const seed = Number(process.env.CBT_E2E_SEED ?? Date.now() % 2 ** 31);

let env: NodeEnv;

interface Summary {
  id: string;
  kind: string;
  bytesRead: number;
  base: string | null;
}

/** One phase of writes through the device: aligned, unaligned, rewrites of earlier ranges, trims. */
function writePhase(device: string, random: () => number, earlier: { offset: number; length: number }[]): void {
  const fd = fs.openSync(device, 'r+');
  const pick = (max: number) => Math.floor(random() * max);
  try {
    for (let i = 0; i < 40; i++) {
      const kind = random();
      let offset: number;
      let length: number;
      if (kind < 0.35) {
        length = (1 + pick(16)) * BLOCK; // aligned
        offset = pick((CAPACITY - length) / BLOCK) * BLOCK;
      } else if (kind < 0.7) {
        length = 1 + pick(20000); // unaligned: any byte offset and length
        offset = pick(CAPACITY - length);
      } else {
        const old = earlier[pick(Math.max(1, earlier.length))] ?? { offset: 0, length: BLOCK }; // rewrite
        offset = old.offset;
        length = old.length;
      }
      fs.writeSync(fd, randomBytes(length), 0, length, offset);
      earlier.push({ offset, length });
    }
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  // Trims: discard a few aligned ranges (they read back as zeros and count as changes).
  for (let i = 0; i < 3; i++) {
    const length = (1 + pick(32)) * BLOCK;
    const offset = pick((CAPACITY - length) / BLOCK) * BLOCK;
    sh('blkdiscard', ['-o', String(offset), '-l', String(length), device]);
  }
}

dataPlaneSuite('backup and restore, CSI direct, through the Node service', () => {
  beforeAll(async () => {
    env = await startNodeEnv();
  });
  afterAll(async () => {
    await env?.cleanup();
  });

  it(`a full backup and incrementals each restore to their snapshot byte for byte; deleting a middle snapshot breaks nothing (seed ${seed})`, async () => {
    const random = mulberry32(seed);
    const repo = env.path('repo');
    const endpoint = ['--endpoint', env.target];
    const source = await publish(env, await createVolume(env, CAPACITY));
    const written: { offset: number; length: number }[] = [];
    const snaps: string[] = [];
    const expected: Buffer[] = [];
    const backups: Summary[] = [];

    const phase = async () => {
      writePhase(source.device, random, written);
      const snap = await snapshot(env, source.volumeId);
      snaps.push(snap);
      expected.push(await snapshotBytes(env, snap, CAPACITY));
      const base = backups.at(-1);
      const r = await runCli([
        'backup',
        '--repo',
        repo,
        '--snapshot',
        snap,
        ...(base ? ['--base', base.id] : []),
        ...endpoint,
        '--json',
        '--quiet',
      ]);
      expect(r.code, r.stderr).toBe(0);
      const summary = jsonOf<Summary>(r);
      expect(summary.kind).toBe(base ? 'incremental' : 'full');
      if (base) expect(summary.bytesRead, 'an incremental reads only what changed').toBeLessThan(CAPACITY / 2);
      backups.push(summary);
    };
    for (let i = 0; i < 4; i++) await phase();

    // The middle snapshot goes; the next incremental builds on the last backup and still works.
    await env.controller.call('deleteSnapshot', { snapshotId: snaps[1]! });
    await phase();

    for (let i = 0; i < backups.length; i++) {
      const target = env.path(`restored-${i}.img`);
      const r = await runCli([
        'restore',
        '--repo',
        repo,
        '--backup',
        backups[i]!.id,
        '--target',
        target,
        '--json',
        '--quiet',
      ]);
      expect(r.code, r.stderr).toBe(0);
      expect(jsonOf<{ chain: string[] }>(r).chain).toEqual(backups.slice(0, i + 1).map((b) => b.id));
      const restored = fs.readFileSync(target);
      expect(restored.length).toBe(CAPACITY);
      expect(restored.equals(expected[i]!), `backup ${i} restores to snapshot ${i}'s bytes`).toBe(true);
    }
    const verify = await runCli(['verify', '--repo', repo, '--json', '--quiet']);
    expect(verify.code, verify.stderr).toBe(0);
    expect(jsonOf<{ ok: boolean; backups: string[] }>(verify)).toMatchObject({
      ok: true,
      backups: backups.map((b) => b.id),
    });
    expect(looserThanPrivate(repo), 'repository dirs 0700, files 0600').toEqual([]);

    // `metadata delta` prints the same extents as JSON, CSV and a table.
    const asJson = await runCli(['metadata', 'delta', snaps[2]!, snaps[3]!, ...endpoint, '--json']);
    expect(asJson.code, asJson.stderr).toBe(0);
    const listed = jsonOf<{
      capacityBytes: number;
      blockMetadataType: string;
      extents: { offset: number; length: number }[];
    }>(asJson);
    expect(listed.capacityBytes).toBe(CAPACITY);
    expect(listed.extents.length).toBeGreaterThan(0);
    const client = connectCsiDirect(env.target);
    const direct: { offset: number; length: number }[] = [];
    for await (const e of await client.delta(snaps[2]!, snaps[3]!)) direct.push(e);
    await client.close();
    expect(listed.extents).toEqual(direct);
    const csv = await runCli(['metadata', 'delta', snaps[2]!, snaps[3]!, ...endpoint, '--format', 'csv']);
    expect(csv.stdout.trim().split('\n')).toEqual(['offset,length', ...direct.map((e) => `${e.offset},${e.length}`)]);
    const table = await runCli(['metadata', 'allocated', snaps[3]!, ...endpoint]);
    expect(table.code, table.stderr).toBe(0);
    expect(table.stdout).toMatch(/^capacity 33554432 bytes \(32\.0 MiB\), VARIABLE_LENGTH$/m);
    expect(table.stdout).toMatch(/^\d+ extents, \d+ bytes/m);

    // No temporary volume is left behind by the backups: only the source volume remains.
    const volumes = await env.controller.call('listVolumes', {});
    expect(volumes.entries.map((e) => e.volume!.volumeId)).toEqual([source.volumeId]);
    await source.release();
  }, 600_000);
});
