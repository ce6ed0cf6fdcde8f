/**
 * The node plugin and mounts and paths it did not make, against a running driver with real mounts. The
 * rule (HELPER-RULES, safety): the driver unmounts and removes only what it created. A staging path or
 * target on which something else is already mounted is refused, not covered; and a path whose parent was
 * swapped for a symlink after the volume was put there is not followed when taking the volume down.
 */
import fs from 'node:fs';
import { status } from '@grpc/grpc-js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { errorOf } from '../support/csi-client.js';
import {
  MiB,
  blockCap,
  dataPlaneSuite,
  isMounted,
  mountAt,
  mountCap,
  sh,
  startNodeEnv,
  type NodeEnv,
} from '../e2e/support/node-env.js';

let env: NodeEnv;
let n = 0;

async function createVolume(): Promise<string> {
  const res = await env.controller.call('createVolume', {
    name: `foreign-${++n}`,
    capacityRange: { requiredBytes: BigInt(16 * MiB) },
    volumeCapabilities: [mountCap()],
  });
  return res.volume!.volumeId;
}

/** An empty tmpfs mounted at a new directory: someone else's mount, which looks like an empty directory. */
function foreignMount(name: string): string {
  const dir = env.path('foreign', name);
  fs.mkdirSync(dir, { recursive: true });
  sh('mount', ['-t', 'tmpfs', '-o', 'size=1m', `foreign-${name}`, dir]);
  return dir;
}

dataPlaneSuite('node plugin: mounts and paths it did not make', () => {
  beforeAll(async () => {
    env = await startNodeEnv();
  }, 60_000);
  afterAll(async () => {
    await env?.cleanup();
  }, 60_000);

  describe('a path on which something else is mounted', () => {
    it('NodeStageVolume (mount): a staging path where another filesystem is mounted is FAILED_PRECONDITION naming the path; nothing is staged, and the mount survives unstage', async () => {
      const vol = await createVolume();
      const staging = foreignMount('staging');
      const res = await errorOf(
        env.node.call('nodeStageVolume', { volumeId: vol, stagingTargetPath: staging, volumeCapability: mountCap() }),
      );
      expect(res.code).toBe(status.FAILED_PRECONDITION);
      expect(res.details).toContain(staging);
      await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging });
      expect(mountAt(staging)?.fsType).toBe('tmpfs');
      // Not staged, so not held: the volume can be deleted.
      await env.controller.call('deleteVolume', { volumeId: vol });
    });

    for (const [kind, cap] of [
      ['mount', mountCap()],
      ['block', blockCap()],
    ] as const) {
      it(`NodePublishVolume (${kind}): a target where another filesystem is mounted is FAILED_PRECONDITION naming the path; it is not covered, and unpublish leaves it mounted`, async () => {
        const vol = await createVolume();
        const staging = env.path('staging', `publish-${kind}`);
        fs.mkdirSync(staging, { recursive: true });
        await env.node.call('nodeStageVolume', { volumeId: vol, stagingTargetPath: staging, volumeCapability: cap });
        let target = foreignMount(`target-${kind}`);
        if (kind === 'block') {
          // A block target is a file: an empty file bind-mounted from someone else's filesystem.
          fs.writeFileSync(`${target}/theirs`, '');
          const file = env.path('foreign', 'block-target-file');
          fs.writeFileSync(file, '');
          sh('mount', ['--bind', `${target}/theirs`, file]);
          target = file;
        }
        const before = mountAt(target);
        const res = await errorOf(
          env.node.call('nodePublishVolume', {
            volumeId: vol,
            stagingTargetPath: staging,
            targetPath: target,
            volumeCapability: cap,
          }),
        );
        expect(res.code).toBe(status.FAILED_PRECONDITION);
        expect(res.details).toContain(target);
        await env.node.call('nodeUnpublishVolume', { volumeId: vol, targetPath: target });
        expect(before?.fsType).toBe('tmpfs');
        expect(mountAt(target)).toEqual(before);
        await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging });
        await env.controller.call('deleteVolume', { volumeId: vol });
      });
    }
  });

  describe('paths on kernel interface filesystems, and names too long', () => {
    it('NodePublishVolume and NodeStageVolume: a path on proc, sysfs or cgroup is INVALID_ARGUMENT naming the path; nothing is created there (a directory made in cgroupfs is a new cgroup)', async () => {
      const vol = await createVolume();
      const staging = env.path('staging', 'kernel-fs');
      fs.mkdirSync(staging, { recursive: true });
      await env.node.call('nodeStageVolume', {
        volumeId: vol,
        stagingTargetPath: staging,
        volumeCapability: mountCap(),
      });
      const name = `cbt-csi-test-${process.pid}-${Date.now()}`;
      const cgroupDir = fs.existsSync('/sys/fs/cgroup/pids') ? '/sys/fs/cgroup/pids' : '/sys/fs/cgroup';
      const paths = [`${cgroupDir}/${name}`, `/proc/self/${name}`, `/sys/${name}`];
      try {
        for (const target of paths) {
          const res = await errorOf(
            env.node.call('nodePublishVolume', {
              volumeId: vol,
              stagingTargetPath: staging,
              targetPath: target,
              volumeCapability: mountCap(),
            }),
          );
          expect(res.code, target).toBe(status.INVALID_ARGUMENT);
          expect(res.details).toContain(target);
          expect(fs.existsSync(target), target).toBe(false);
        }
        const other = await createVolume();
        const res = await errorOf(
          env.node.call('nodeStageVolume', {
            volumeId: other,
            stagingTargetPath: `${cgroupDir}/${name}`,
            volumeCapability: mountCap(),
          }),
        );
        expect(res.code).toBe(status.INVALID_ARGUMENT);
        expect(fs.existsSync(`${cgroupDir}/${name}`)).toBe(false);
        // Refused before anything was recorded or held: the volume can be deleted at once.
        await env.controller.call('deleteVolume', { volumeId: other });
      } finally {
        for (const target of paths) {
          // Only what the old code could leave: its mount, and the directory it made (rmdir removes a cgroup).
          if (isMounted(target)) sh('umount', [target]);
          if (fs.existsSync(target)) fs.rmdirSync(target);
        }
      }
      await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging });
      await env.controller.call('deleteVolume', { volumeId: vol });
    });

    it('NodePublishVolume and NodeStageVolume: a path with a component longer than 255 bytes is INVALID_ARGUMENT, not an internal error', async () => {
      const vol = await createVolume();
      const long = env.path('x'.repeat(256));
      const stage = await errorOf(
        env.node.call('nodeStageVolume', { volumeId: vol, stagingTargetPath: long, volumeCapability: mountCap() }),
      );
      expect(stage.code).toBe(status.INVALID_ARGUMENT);
      expect(stage.details).toContain('255');
      const staging = env.path('staging', 'long-names');
      fs.mkdirSync(staging, { recursive: true });
      await env.node.call('nodeStageVolume', {
        volumeId: vol,
        stagingTargetPath: staging,
        volumeCapability: mountCap(),
      });
      const publish = await errorOf(
        env.node.call('nodePublishVolume', {
          volumeId: vol,
          stagingTargetPath: staging,
          targetPath: long,
          volumeCapability: mountCap(),
        }),
      );
      expect(publish.code).toBe(status.INVALID_ARGUMENT);
      await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging });
      await env.controller.call('deleteVolume', { volumeId: vol });
    });
  });

  describe('a path that cannot be created', () => {
    it('NodePublishVolume: a target under a read-only filesystem is FAILED_PRECONDITION naming the path and the errno; nothing stays recorded', async () => {
      const vol = await createVolume();
      const staging = env.path('staging', 'read-only-parent');
      fs.mkdirSync(staging, { recursive: true });
      await env.node.call('nodeStageVolume', {
        volumeId: vol,
        stagingTargetPath: staging,
        volumeCapability: mountCap(),
      });
      const parent = env.path('read-only-parent');
      fs.mkdirSync(parent);
      sh('mount', ['-t', 'tmpfs', '-o', 'ro,size=1m', 'read-only-parent', parent]);
      const res = await errorOf(
        env.node.call('nodePublishVolume', {
          volumeId: vol,
          stagingTargetPath: staging,
          targetPath: `${parent}/target`,
          volumeCapability: mountCap(),
        }),
      );
      expect(res.code).toBe(status.FAILED_PRECONDITION);
      expect(res.details).toContain(`${parent}/target`);
      expect(res.details).toContain('EROFS');
      // The failed publish left no publication behind: unstage is not refused as "still published".
      await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging });
      await env.controller.call('deleteVolume', { volumeId: vol });
    });
  });

  describe('two volumes sent to one place at once', () => {
    it('NodePublishVolume of two volumes at one target at the same time: one is published, the other is FAILED_PRECONDITION; unpublishing the winner leaves nothing mounted and the loser was never there', async () => {
      const vols = [await createVolume(), await createVolume()];
      const stagings = vols.map((_, i) => env.path('staging', `race-${i}`));
      for (const [i, vol] of vols.entries()) {
        fs.mkdirSync(stagings[i]!, { recursive: true });
        await env.node.call('nodeStageVolume', {
          volumeId: vol,
          stagingTargetPath: stagings[i]!,
          volumeCapability: mountCap(),
        });
      }
      for (let round = 0; round < 4; round++) {
        const target = env.path('race', `target-${round}`);
        fs.mkdirSync(target, { recursive: true });
        const results = await Promise.all(
          vols.map((vol, i) =>
            errorOf(
              env.node.call('nodePublishVolume', {
                volumeId: vol,
                stagingTargetPath: stagings[i]!,
                targetPath: target,
                volumeCapability: mountCap(),
              }),
            ),
          ),
        );
        expect(results.map((r) => r.code).sort(), `round ${round}`).toEqual([status.OK, status.FAILED_PRECONDITION]);
        const winner = vols[results.findIndex((r) => r.code === status.OK)]!;
        const loser = vols.find((v) => v !== winner)!;
        // The loser has no publication there: its unpublish touches nothing.
        await env.node.call('nodeUnpublishVolume', { volumeId: loser, targetPath: target });
        expect(isMounted(target), `round ${round}`).toBe(true);
        await env.node.call('nodeUnpublishVolume', { volumeId: winner, targetPath: target });
        expect(isMounted(target), `round ${round}`).toBe(false);
      }
      for (const [i, vol] of vols.entries()) {
        await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: stagings[i]! });
        await env.controller.call('deleteVolume', { volumeId: vol });
      }
    });
  });

  describe('a parent swapped for a symlink after publish or stage', () => {
    it('NodeUnpublishVolume and NodeUnstageVolume: when the parent of the path now leads elsewhere, they are FAILED_PRECONDITION and remove nothing there; the records stay, and with the parent back both work', async () => {
      const vol = await createVolume();
      const stagingParent = env.path('swap', 'staging-parent');
      const podDir = env.path('swap', 'pod');
      fs.mkdirSync(stagingParent, { recursive: true });
      fs.mkdirSync(podDir, { recursive: true });
      const staging = `${stagingParent}/staging`;
      const target = `${podDir}/target`;
      // Both absent: the driver creates them, so they are what it removes at the end.
      await env.node.call('nodeStageVolume', {
        volumeId: vol,
        stagingTargetPath: staging,
        volumeCapability: mountCap(),
      });
      await env.node.call('nodePublishVolume', {
        volumeId: vol,
        stagingTargetPath: staging,
        targetPath: target,
        volumeCapability: mountCap(),
      });
      expect(isMounted(target)).toBe(true);

      // The pod directory is moved away (its mount goes with it) and a symlink to someone else's
      // directory, which holds an empty "target" of its own, takes its place.
      const elsewhere = env.path('swap', 'elsewhere');
      fs.mkdirSync(`${elsewhere}/target`, { recursive: true });
      fs.writeFileSync(`${elsewhere}/staging`, '');
      fs.renameSync(podDir, `${podDir}.moved`);
      fs.symlinkSync(elsewhere, podDir);
      const unpublish = await errorOf(env.node.call('nodeUnpublishVolume', { volumeId: vol, targetPath: target }));
      expect(unpublish.code).toBe(status.FAILED_PRECONDITION);
      expect(unpublish.details).toContain(target);
      expect(fs.existsSync(`${elsewhere}/target`)).toBe(true);
      expect(isMounted(`${podDir}.moved/target`)).toBe(true);

      // The parent comes back: the publication was kept, and unpublish takes it down.
      fs.unlinkSync(podDir);
      fs.renameSync(`${podDir}.moved`, podDir);
      await env.node.call('nodeUnpublishVolume', { volumeId: vol, targetPath: target });
      expect(isMounted(target)).toBe(false);
      expect(fs.existsSync(target)).toBe(false);

      // The same for the staging path.
      fs.renameSync(stagingParent, `${stagingParent}.moved`);
      fs.rmSync(`${elsewhere}/staging`);
      fs.mkdirSync(`${elsewhere}/staging`);
      fs.symlinkSync(elsewhere, stagingParent);
      const unstage = await errorOf(env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging }));
      expect(unstage.code).toBe(status.FAILED_PRECONDITION);
      expect(unstage.details).toContain(staging);
      expect(fs.existsSync(`${elsewhere}/staging`)).toBe(true);
      expect(isMounted(`${stagingParent}.moved/staging`)).toBe(true);
      fs.unlinkSync(stagingParent);
      fs.renameSync(`${stagingParent}.moved`, stagingParent);
      await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging });
      expect(isMounted(staging)).toBe(false);
      expect(fs.existsSync(staging)).toBe(false);
      await env.controller.call('deleteVolume', { volumeId: vol });
    });
  });
});
