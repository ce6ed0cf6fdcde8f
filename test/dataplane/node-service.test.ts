/**
 * CSI Node service conformance, against a running driver (`cbt-csi serve` in a child process) through
 * grpc-js, with real loop devices, filesystems and mounts. Each test names the rule it checks.
 */
import fs from 'node:fs';
import { status } from '@grpc/grpc-js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TOPOLOGY_NODE_KEY } from '../../src/config.js';
import { NodeServiceCapability_RPC_Type as RpcType, VolumeUsage_Unit } from '../../src/gen/csi/v1/csi_pb.js';
import { Controller, Node } from '../../src/gen/csi/v1/csi_pb.js';
import { ServiceClient, codeOf, errorOf } from '../support/csi-client.js';
import { startTestDriver } from '../support/test-driver.js';
import {
  MiB,
  blockCap,
  dataPlaneSuite,
  directRead,
  directWrite,
  isMounted,
  loopDevicesUnder,
  mountAt,
  mountCap,
  sh,
  startNodeEnv,
  type NodeEnv,
} from '../e2e/support/node-env.js';

const SINGLE_NODE_WRITER = 1;
const SINGLE_NODE_READER_ONLY = 2;
const MULTI_NODE_MULTI_WRITER = 5;
const SINGLE_NODE_SINGLE_WRITER = 6;
const SINGLE_NODE_MULTI_WRITER = 7;

const CAP_SYS_RESOURCE = 24;

/** Whether this process (and so the driver it starts) has a capability in its effective set. */
function hasCapability(bit: number): boolean {
  const line = fs
    .readFileSync('/proc/self/status', 'utf8')
    .split('\n')
    .find((l) => l.startsWith('CapEff:'));
  return ((BigInt(`0x${line?.split(/\s+/)[1] ?? '0'}`) >> BigInt(bit)) & 1n) === 1n;
}

let env: NodeEnv;
let n = 0;

async function createVolume(bytes = 64 * MiB): Promise<string> {
  const res = await env.controller.call('createVolume', {
    name: `node-test-${++n}`,
    capacityRange: { requiredBytes: BigInt(bytes) },
    volumeCapabilities: [mountCap()],
  });
  return res.volume!.volumeId;
}

/** A staging directory as the CO makes it. */
function stagingDir(name: string): string {
  const p = env.path('staging', name);
  fs.mkdirSync(p, { recursive: true });
  return p;
}

/** A target path whose parent exists, as the CO guarantees. */
function targetPath(name: string): string {
  fs.mkdirSync(env.path('pods'), { recursive: true });
  return env.path('pods', name);
}

dataPlaneSuite('CSI Node service', () => {
  beforeAll(async () => {
    env = await startNodeEnv(['--max-volumes-per-node', '64']);
  }, 60_000);
  afterAll(async () => {
    await env?.cleanup();
  }, 60_000);

  describe('NodeGetCapabilities and NodeGetInfo', () => {
    it('NodeGetCapabilities: advertises exactly the node RPCs implemented (stage/unstage, stats, expand, condition, single-node multi-writer)', async () => {
      const res = await env.node.call('nodeGetCapabilities', {});
      const types = res.capabilities.map((c) => (c.type.case === 'rpc' ? c.type.value.type : RpcType.UNKNOWN)).sort();
      expect(types).toEqual(
        [
          RpcType.STAGE_UNSTAGE_VOLUME,
          RpcType.GET_VOLUME_STATS,
          RpcType.EXPAND_VOLUME,
          RpcType.VOLUME_CONDITION,
          RpcType.SINGLE_NODE_MULTI_WRITER,
        ].sort(),
      );
    });

    it('NodeGetInfo: reports the configured node ID, max_volumes_per_node and this node as its topology', async () => {
      const res = await env.node.call('nodeGetInfo', {});
      expect(res.nodeId).toBe('test-node');
      expect(res.maxVolumesPerNode).toBe(64n);
      expect(res.accessibleTopology?.segments).toEqual({ [TOPOLOGY_NODE_KEY]: 'test-node' });
    });
  });

  describe('NodeStageVolume', () => {
    it('NodeStageVolume: volume_id, staging_target_path and volume_capability are required (INVALID_ARGUMENT)', async () => {
      const vol = await createVolume();
      const staging = stagingDir('required');
      expect(
        await codeOf(env.node.call('nodeStageVolume', { stagingTargetPath: staging, volumeCapability: mountCap() })),
      ).toBe(status.INVALID_ARGUMENT);
      expect(await codeOf(env.node.call('nodeStageVolume', { volumeId: vol, volumeCapability: mountCap() }))).toBe(
        status.INVALID_ARGUMENT,
      );
      expect(await codeOf(env.node.call('nodeStageVolume', { volumeId: vol, stagingTargetPath: staging }))).toBe(
        status.INVALID_ARGUMENT,
      );
      // A capability without an access type or without an access mode is malformed.
      expect(
        await codeOf(
          env.node.call('nodeStageVolume', {
            volumeId: vol,
            stagingTargetPath: staging,
            volumeCapability: { accessMode: { mode: 1 } },
          }),
        ),
      ).toBe(status.INVALID_ARGUMENT);
      expect(loopDevicesUnder(env.stateDir)).toEqual([]);
    });

    it('NodeStageVolume: a relative staging_target_path is INVALID_ARGUMENT', async () => {
      const vol = await createVolume();
      expect(
        await codeOf(
          env.node.call('nodeStageVolume', {
            volumeId: vol,
            stagingTargetPath: 'relative/staging',
            volumeCapability: mountCap(),
          }),
        ),
      ).toBe(status.INVALID_ARGUMENT);
    });

    it('NodeStageVolume: an unknown or malformed volume_id is NOT_FOUND', async () => {
      const staging = stagingDir('unknown');
      expect(
        await codeOf(
          env.node.call('nodeStageVolume', {
            volumeId: 'vol-0123456789abcdef',
            stagingTargetPath: staging,
            volumeCapability: mountCap(),
          }),
        ),
      ).toBe(status.NOT_FOUND);
      expect(
        await codeOf(
          env.node.call('nodeStageVolume', {
            volumeId: '../../etc',
            stagingTargetPath: staging,
            volumeCapability: mountCap(),
          }),
        ),
      ).toBe(status.NOT_FOUND);
    });

    it('NodeStageVolume: capabilities the volume cannot have (a MULTI_NODE mode, an unknown fs_type) are FAILED_PRECONDITION', async () => {
      const vol = await createVolume();
      const staging = stagingDir('exceeds');
      expect(
        await codeOf(
          env.node.call('nodeStageVolume', {
            volumeId: vol,
            stagingTargetPath: staging,
            volumeCapability: mountCap('', MULTI_NODE_MULTI_WRITER),
          }),
        ),
      ).toBe(status.FAILED_PRECONDITION);
      expect(
        await codeOf(
          env.node.call('nodeStageVolume', {
            volumeId: vol,
            stagingTargetPath: staging,
            volumeCapability: mountCap('btrfs'),
          }),
        ),
      ).toBe(status.FAILED_PRECONDITION);
      expect(isMounted(staging)).toBe(false);
    });

    it('NodeStageVolume (mount): formats a blank volume as ext4 by default, mounts it at the staging path on a direct-I/O loop device', async () => {
      const vol = await createVolume();
      const staging = stagingDir('ext4-default');
      await env.node.call('nodeStageVolume', {
        volumeId: vol,
        stagingTargetPath: staging,
        volumeCapability: mountCap(),
      });
      const mount = mountAt(staging);
      expect(mount?.fsType).toBe('ext4');
      const devices = loopDevicesUnder(env.stateDir).filter((d) => d.backFile.endsWith(`/${vol}`));
      expect(devices).toHaveLength(1);
      expect(devices[0]!.dio).toBe(true);
      expect(mount?.source).toBe(devices[0]!.name);
      // Idempotent: the same request again is OK and changes nothing.
      await env.node.call('nodeStageVolume', {
        volumeId: vol,
        stagingTargetPath: staging,
        volumeCapability: mountCap(),
      });
      expect(loopDevicesUnder(env.stateDir).filter((d) => d.backFile.endsWith(`/${vol}`))).toHaveLength(1);
      await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging });
      expect(isMounted(staging)).toBe(false);
      expect(loopDevicesUnder(env.stateDir).filter((d) => d.backFile.endsWith(`/${vol}`))).toEqual([]);
    });

    it('NodeStageVolume (mount): a volume staged again after unstaging keeps its filesystem and files (mkfs happens once)', async () => {
      // xfs needs at least 300 MB.
      const vol = await createVolume(320 * MiB);
      const staging = stagingDir('keeps');
      const stage = () =>
        env.node.call('nodeStageVolume', {
          volumeId: vol,
          stagingTargetPath: staging,
          volumeCapability: mountCap('xfs'),
        });
      await stage();
      expect(mountAt(staging)?.fsType).toBe('xfs');
      fs.writeFileSync(`${staging}/kept.txt`, 'still here');
      await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging });
      await stage();
      expect(fs.readFileSync(`${staging}/kept.txt`, 'utf8')).toBe('still here');
      // The volume holds xfs now: asking for ext4 on it is refused rather than reformatting it.
      await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging });
      expect(
        await codeOf(
          env.node.call('nodeStageVolume', {
            volumeId: vol,
            stagingTargetPath: staging,
            volumeCapability: mountCap('ext4'),
          }),
        ),
      ).toBe(status.FAILED_PRECONDITION);
      expect(isMounted(staging)).toBe(false);
    });

    it('NodeStageVolume (mount): mount_flags are applied to the staging mount', async () => {
      const vol = await createVolume();
      const staging = stagingDir('flags');
      await env.node.call('nodeStageVolume', {
        volumeId: vol,
        stagingTargetPath: staging,
        volumeCapability: mountCap('ext4', SINGLE_NODE_WRITER, ['noatime', 'nosuid']),
      });
      const options =
        fs
          .readFileSync('/proc/self/mountinfo', 'utf8')
          .split('\n')
          .find((l) => l.split(' ')[4] === staging) ?? '';
      expect(options).toMatch(/\bnoatime\b/);
      expect(options).toMatch(/\bnosuid\b/);
      await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging });
    });

    it('NodeStageVolume: the same volume and path with a different volume_capability is ALREADY_EXISTS', async () => {
      const vol = await createVolume();
      const staging = stagingDir('incompatible');
      await env.node.call('nodeStageVolume', {
        volumeId: vol,
        stagingTargetPath: staging,
        volumeCapability: mountCap(),
      });
      expect(
        await codeOf(
          env.node.call('nodeStageVolume', { volumeId: vol, stagingTargetPath: staging, volumeCapability: blockCap() }),
        ),
      ).toBe(status.ALREADY_EXISTS);
      expect(
        await codeOf(
          env.node.call('nodeStageVolume', {
            volumeId: vol,
            stagingTargetPath: staging,
            volumeCapability: mountCap('', SINGLE_NODE_MULTI_WRITER),
          }),
        ),
      ).toBe(status.ALREADY_EXISTS);
      await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging });
    });

    it('NodeStageVolume (block): attaches a direct-I/O loop device and mounts nothing at the staging path', async () => {
      const vol = await createVolume(32 * MiB);
      const staging = stagingDir('block');
      await env.node.call('nodeStageVolume', {
        volumeId: vol,
        stagingTargetPath: staging,
        volumeCapability: blockCap(),
      });
      expect(isMounted(staging)).toBe(false);
      const devices = loopDevicesUnder(env.stateDir).filter((d) => d.backFile.endsWith(`/${vol}`));
      expect(devices.map((d) => d.dio)).toEqual([true]);
      expect(Number(sh('blockdev', ['--getsize64', devices[0]!.name]).trim())).toBe(32 * MiB);
      await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging });
    });

    it('DeleteVolume: a staged volume cannot be deleted (FAILED_PRECONDITION) until it is unstaged', async () => {
      const vol = await createVolume();
      const staging = stagingDir('held');
      await env.node.call('nodeStageVolume', {
        volumeId: vol,
        stagingTargetPath: staging,
        volumeCapability: blockCap(),
      });
      expect(await codeOf(env.controller.call('deleteVolume', { volumeId: vol }))).toBe(status.FAILED_PRECONDITION);
      await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging });
      await env.controller.call('deleteVolume', { volumeId: vol });
    });
  });

  describe('NodeUnstageVolume', () => {
    it('NodeUnstageVolume: volume_id and staging_target_path are required; a relative path is INVALID_ARGUMENT', async () => {
      const vol = await createVolume();
      expect(await codeOf(env.node.call('nodeUnstageVolume', { stagingTargetPath: stagingDir('u1') }))).toBe(
        status.INVALID_ARGUMENT,
      );
      expect(await codeOf(env.node.call('nodeUnstageVolume', { volumeId: vol }))).toBe(status.INVALID_ARGUMENT);
      expect(await codeOf(env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: 'rel' }))).toBe(
        status.INVALID_ARGUMENT,
      );
    });

    it('NodeUnstageVolume: a volume that is not staged there is OK (idempotent); an unknown volume is NOT_FOUND', async () => {
      const vol = await createVolume();
      await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: stagingDir('never') });
      expect(
        await codeOf(
          env.node.call('nodeUnstageVolume', {
            volumeId: 'vol-00000000000000ff',
            stagingTargetPath: stagingDir('never'),
          }),
        ),
      ).toBe(status.NOT_FOUND);
    });

    it('NodeUnstageVolume: refused (FAILED_PRECONDITION) while the volume is still published', async () => {
      const vol = await createVolume();
      const staging = stagingDir('busy');
      const target = targetPath('busy');
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
      expect(await codeOf(env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging }))).toBe(
        status.FAILED_PRECONDITION,
      );
      expect(isMounted(staging)).toBe(true);
      await env.node.call('nodeUnpublishVolume', { volumeId: vol, targetPath: target });
      await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging });
      await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging });
    });
  });

  describe('NodePublishVolume and NodeUnpublishVolume', () => {
    it('NodePublishVolume: required fields are INVALID_ARGUMENT, a missing staging_target_path is FAILED_PRECONDITION', async () => {
      const vol = await createVolume();
      const staging = stagingDir('p-required');
      const base = {
        volumeId: vol,
        stagingTargetPath: staging,
        targetPath: targetPath('p-required'),
        volumeCapability: mountCap(),
      };
      expect(await codeOf(env.node.call('nodePublishVolume', { ...base, volumeId: '' }))).toBe(status.INVALID_ARGUMENT);
      expect(await codeOf(env.node.call('nodePublishVolume', { ...base, targetPath: '' }))).toBe(
        status.INVALID_ARGUMENT,
      );
      expect(await codeOf(env.node.call('nodePublishVolume', { ...base, targetPath: 'pods/relative' }))).toBe(
        status.INVALID_ARGUMENT,
      );
      expect(await codeOf(env.node.call('nodePublishVolume', { ...base, volumeCapability: undefined }))).toBe(
        status.INVALID_ARGUMENT,
      );
      expect(await codeOf(env.node.call('nodePublishVolume', { ...base, stagingTargetPath: '' }))).toBe(
        status.FAILED_PRECONDITION,
      );
    });

    it('NodePublishVolume: a volume that is not staged is FAILED_PRECONDITION; an unknown one is NOT_FOUND', async () => {
      const vol = await createVolume();
      const req = {
        volumeId: vol,
        stagingTargetPath: stagingDir('p-unstaged'),
        targetPath: targetPath('p-unstaged'),
        volumeCapability: mountCap(),
      };
      expect(await codeOf(env.node.call('nodePublishVolume', req))).toBe(status.FAILED_PRECONDITION);
      expect(await codeOf(env.node.call('nodePublishVolume', { ...req, volumeId: 'vol-00000000000000fe' }))).toBe(
        status.NOT_FOUND,
      );
      expect(fs.existsSync(req.targetPath)).toBe(false);
    });

    it('NodePublishVolume (mount): bind-mounts the staged filesystem at the target (created by the plugin); NodeUnpublishVolume removes it', async () => {
      const vol = await createVolume();
      const staging = stagingDir('p-mount');
      const target = targetPath('p-mount');
      await env.node.call('nodeStageVolume', {
        volumeId: vol,
        stagingTargetPath: staging,
        volumeCapability: mountCap(),
      });
      const req = { volumeId: vol, stagingTargetPath: staging, targetPath: target, volumeCapability: mountCap() };
      await env.node.call('nodePublishVolume', req);
      await env.node.call('nodePublishVolume', req); // idempotent
      fs.writeFileSync(`${target}/through-target`, 'pod data');
      expect(fs.readFileSync(`${staging}/through-target`, 'utf8')).toBe('pod data');
      await env.node.call('nodeUnpublishVolume', { volumeId: vol, targetPath: target });
      expect(isMounted(target)).toBe(false);
      expect(fs.existsSync(target)).toBe(false);
      await env.node.call('nodeUnpublishVolume', { volumeId: vol, targetPath: target }); // idempotent
      await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging });
    });

    it('NodePublishVolume (mount, readonly): the target refuses writes (EROFS) while the staging mount stays writable', async () => {
      const vol = await createVolume();
      const staging = stagingDir('p-ro');
      const target = targetPath('p-ro');
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
        readonly: true,
      });
      expect(() => fs.writeFileSync(`${target}/x`, 'no')).toThrow(/EROFS/);
      fs.writeFileSync(`${staging}/y`, 'yes');
      // The same target with another readonly flag, or another capability, is ALREADY_EXISTS.
      expect(
        await codeOf(
          env.node.call('nodePublishVolume', {
            volumeId: vol,
            stagingTargetPath: staging,
            targetPath: target,
            volumeCapability: mountCap(),
            readonly: false,
          }),
        ),
      ).toBe(status.ALREADY_EXISTS);
      expect(
        await codeOf(
          env.node.call('nodePublishVolume', {
            volumeId: vol,
            stagingTargetPath: staging,
            targetPath: target,
            volumeCapability: mountCap('', SINGLE_NODE_MULTI_WRITER),
            readonly: true,
          }),
        ),
      ).toBe(status.ALREADY_EXISTS);
      await env.node.call('nodeUnpublishVolume', { volumeId: vol, targetPath: target });
      await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging });
    });

    it('NodePublishVolume: a second target is FAILED_PRECONDITION for SINGLE_NODE_SINGLE_WRITER and OK for SINGLE_NODE_MULTI_WRITER', async () => {
      for (const [mode, second] of [
        [SINGLE_NODE_SINGLE_WRITER, status.FAILED_PRECONDITION],
        [SINGLE_NODE_MULTI_WRITER, status.OK],
      ] as const) {
        const vol = await createVolume();
        const staging = stagingDir(`p-multi-${mode}`);
        const t1 = targetPath(`p-multi-${mode}-1`);
        const t2 = targetPath(`p-multi-${mode}-2`);
        const cap = mountCap('', mode);
        await env.node.call('nodeStageVolume', { volumeId: vol, stagingTargetPath: staging, volumeCapability: cap });
        await env.node.call('nodePublishVolume', {
          volumeId: vol,
          stagingTargetPath: staging,
          targetPath: t1,
          volumeCapability: cap,
        });
        expect(
          await codeOf(
            env.node.call('nodePublishVolume', {
              volumeId: vol,
              stagingTargetPath: staging,
              targetPath: t2,
              volumeCapability: cap,
            }),
          ),
        ).toBe(second);
        for (const t of [t1, t2]) await env.node.call('nodeUnpublishVolume', { volumeId: vol, targetPath: t });
        await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging });
      }
    });

    it('NodePublishVolume (block): the target is the volume device; readonly gives a device that refuses writes', async () => {
      const vol = await createVolume(16 * MiB);
      const staging = stagingDir('p-block');
      const rw = targetPath('p-block-rw');
      const ro = targetPath('p-block-ro');
      await env.node.call('nodeStageVolume', {
        volumeId: vol,
        stagingTargetPath: staging,
        volumeCapability: blockCap(SINGLE_NODE_MULTI_WRITER),
      });
      await env.node.call('nodePublishVolume', {
        volumeId: vol,
        stagingTargetPath: staging,
        targetPath: rw,
        volumeCapability: blockCap(SINGLE_NODE_MULTI_WRITER),
      });
      await env.node.call('nodePublishVolume', {
        volumeId: vol,
        stagingTargetPath: staging,
        targetPath: ro,
        volumeCapability: blockCap(SINGLE_NODE_MULTI_WRITER),
        readonly: true,
      });
      expect(fs.statSync(rw).isBlockDevice()).toBe(true);
      const data = Buffer.alloc(8192, 0x5a);
      directWrite(rw, 4096, data, env.path('scratch'));
      expect(
        directRead(ro, 16 * MiB, env.path('scratch'))
          .subarray(4096, 4096 + 8192)
          .equals(data),
      ).toBe(true);
      expect(() => directWrite(ro, 0, Buffer.alloc(512, 1), env.path('scratch'))).toThrow();
      for (const t of [rw, ro]) await env.node.call('nodeUnpublishVolume', { volumeId: vol, targetPath: t });
      expect(fs.existsSync(rw) || fs.existsSync(ro)).toBe(false);
      await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging });
      expect(loopDevicesUnder(env.stateDir).filter((d) => d.backFile.endsWith(`/${vol}`))).toEqual([]);
    });

    it('NodePublishVolume: a block publish of a volume staged for mount is FAILED_PRECONDITION', async () => {
      const vol = await createVolume();
      const staging = stagingDir('p-kind');
      await env.node.call('nodeStageVolume', {
        volumeId: vol,
        stagingTargetPath: staging,
        volumeCapability: mountCap(),
      });
      expect(
        await codeOf(
          env.node.call('nodePublishVolume', {
            volumeId: vol,
            stagingTargetPath: staging,
            targetPath: targetPath('p-kind'),
            volumeCapability: blockCap(),
          }),
        ),
      ).toBe(status.FAILED_PRECONDITION);
      await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging });
    });

    it('NodeUnpublishVolume: required fields are INVALID_ARGUMENT; an unknown volume is NOT_FOUND', async () => {
      expect(await codeOf(env.node.call('nodeUnpublishVolume', { targetPath: targetPath('u') }))).toBe(
        status.INVALID_ARGUMENT,
      );
      expect(await codeOf(env.node.call('nodeUnpublishVolume', { volumeId: await createVolume() }))).toBe(
        status.INVALID_ARGUMENT,
      );
      expect(
        await codeOf(
          env.node.call('nodeUnpublishVolume', { volumeId: 'vol-00000000000000fd', targetPath: targetPath('u') }),
        ),
      ).toBe(status.NOT_FOUND);
    });
  });

  describe('paths the driver does not own (issue 15 item 1)', () => {
    /** A volume staged at a CO-made staging directory, ready to publish. */
    async function staged(
      name: string,
      cap: ReturnType<typeof mountCap> | ReturnType<typeof blockCap>,
    ): Promise<{ vol: string; staging: string }> {
      const vol = await createVolume(16 * MiB);
      const staging = stagingDir(name);
      await env.node.call('nodeStageVolume', { volumeId: vol, stagingTargetPath: staging, volumeCapability: cap });
      return { vol, staging };
    }

    it('NodePublishVolume (block): an existing non-empty file, a directory or a FIFO at target_path is FAILED_PRECONDITION naming the path; the file is not covered and survives unpublish', async () => {
      const { vol, staging } = await staged('own-block', blockCap());
      const file = targetPath('own-block-file');
      fs.writeFileSync(file, "somebody else's data");
      const dir = targetPath('own-block-dir');
      fs.mkdirSync(dir);
      const fifo = targetPath('own-block-fifo');
      sh('mkfifo', [fifo]);
      for (const target of [file, dir, fifo]) {
        const res = await errorOf(
          env.node.call('nodePublishVolume', {
            volumeId: vol,
            stagingTargetPath: staging,
            targetPath: target,
            volumeCapability: blockCap(),
          }),
        );
        expect(res.code, target).toBe(status.FAILED_PRECONDITION);
        expect(res.details).toContain(target);
        expect(isMounted(target)).toBe(false);
        await env.node.call('nodeUnpublishVolume', { volumeId: vol, targetPath: target });
      }
      expect(fs.readFileSync(file, 'utf8')).toBe("somebody else's data");
      expect(fs.statSync(dir).isDirectory() && fs.statSync(fifo).isFIFO()).toBe(true);
      await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging });
    });

    it('NodePublishVolume (block): an existing empty file at target_path is used and left in place at unpublish (the driver did not create it)', async () => {
      const { vol, staging } = await staged('own-block-empty', blockCap());
      const target = targetPath('own-block-empty');
      fs.writeFileSync(target, '');
      await env.node.call('nodePublishVolume', {
        volumeId: vol,
        stagingTargetPath: staging,
        targetPath: target,
        volumeCapability: blockCap(),
      });
      expect(fs.statSync(target).isBlockDevice()).toBe(true);
      await env.node.call('nodeUnpublishVolume', { volumeId: vol, targetPath: target });
      expect(isMounted(target)).toBe(false);
      expect(fs.lstatSync(target).isFile()).toBe(true);
      await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging });
    });

    it('NodePublishVolume (mount): a non-empty directory or a file at target_path is FAILED_PRECONDITION naming the path; nothing is mounted over it', async () => {
      const { vol, staging } = await staged('own-mount', mountCap());
      const dir = targetPath('own-mount-dir');
      fs.mkdirSync(dir);
      fs.writeFileSync(`${dir}/keep`, 'keep me');
      const file = targetPath('own-mount-file');
      fs.writeFileSync(file, '');
      for (const target of [dir, file]) {
        const res = await errorOf(
          env.node.call('nodePublishVolume', {
            volumeId: vol,
            stagingTargetPath: staging,
            targetPath: target,
            volumeCapability: mountCap(),
          }),
        );
        expect(res.code, target).toBe(status.FAILED_PRECONDITION);
        expect(res.details).toContain(target);
        expect(isMounted(target)).toBe(false);
      }
      expect(fs.readFileSync(`${dir}/keep`, 'utf8')).toBe('keep me');
      // An empty directory the CO made is used, and left in place at unpublish.
      const made = targetPath('own-mount-made');
      fs.mkdirSync(made);
      await env.node.call('nodePublishVolume', {
        volumeId: vol,
        stagingTargetPath: staging,
        targetPath: made,
        volumeCapability: mountCap(),
      });
      expect(isMounted(made)).toBe(true);
      await env.node.call('nodeUnpublishVolume', { volumeId: vol, targetPath: made });
      expect(isMounted(made)).toBe(false);
      expect(fs.statSync(made).isDirectory()).toBe(true);
      await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging });
    });

    it('NodePublishVolume and NodeStageVolume: a path inside the state directory, directly or through a symlinked parent, is INVALID_ARGUMENT naming the path; the store keeps working', async () => {
      const { vol, staging } = await staged('own-state', blockCap());
      const link = env.path('link-to-state');
      fs.symlinkSync(env.stateDir, link);
      // A layer file of the store: publishing onto it and unpublishing deleted the volume's data.
      const layerFile = (fs.readdirSync(env.stateDir, { recursive: true }) as string[])
        .map((rel) => `${env.stateDir}/${rel}`)
        .find((p) => p.includes('/layers/') && fs.lstatSync(p).isFile());
      expect(layerFile).toBeDefined();
      const layerBytes = fs.statSync(layerFile!).size;
      const candidates = [`${env.stateDir}/published-here`, `${link}/published-here`, layerFile!];
      for (const target of candidates) {
        const res = await errorOf(
          env.node.call('nodePublishVolume', {
            volumeId: vol,
            stagingTargetPath: staging,
            targetPath: target,
            volumeCapability: blockCap(),
          }),
        );
        expect(res.code, target).toBe(status.INVALID_ARGUMENT);
        expect(res.details).toContain(target);
        await env.node.call('nodeUnpublishVolume', { volumeId: vol, targetPath: target });
      }
      expect(fs.existsSync(`${env.stateDir}/published-here`)).toBe(false);
      expect(fs.statSync(layerFile!).size).toBe(layerBytes);
      const other = await createVolume(16 * MiB);
      for (const stagingPath of [`${env.stateDir}/staged-here`, `${link}/staged-here`]) {
        const res = await errorOf(
          env.node.call('nodeStageVolume', {
            volumeId: other,
            stagingTargetPath: stagingPath,
            volumeCapability: mountCap(),
          }),
        );
        expect(res.code, stagingPath).toBe(status.INVALID_ARGUMENT);
        expect(res.details).toContain(stagingPath);
        expect(isMounted(stagingPath)).toBe(false);
      }
      await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging });
      await env.controller.call('deleteVolume', { volumeId: vol });
      expect(
        await codeOf(
          env.controller.call('createVolume', {
            name: `after-state-${n}`,
            capacityRange: { requiredBytes: BigInt(MiB) },
            volumeCapabilities: [mountCap()],
          }),
        ),
      ).toBe(status.OK);
    });

    it('NodePublishVolume and NodeStageVolume: a symlink at target_path or staging_target_path is refused naming the path and never followed', async () => {
      const { vol, staging } = await staged('own-link', mountCap());
      const elsewhere = env.path('link-points-here');
      fs.mkdirSync(elsewhere);
      const target = targetPath('own-link');
      fs.symlinkSync(elsewhere, target);
      const res = await errorOf(
        env.node.call('nodePublishVolume', {
          volumeId: vol,
          stagingTargetPath: staging,
          targetPath: target,
          volumeCapability: mountCap(),
        }),
      );
      expect([status.INVALID_ARGUMENT, status.FAILED_PRECONDITION]).toContain(res.code);
      expect(res.details).toContain(target);
      expect(isMounted(elsewhere) || isMounted(target)).toBe(false);
      await env.node.call('nodeUnpublishVolume', { volumeId: vol, targetPath: target });
      expect(fs.lstatSync(target).isSymbolicLink()).toBe(true);
      await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging });

      const other = await createVolume(16 * MiB);
      const stagingLink = env.path('staging', 'own-link-staging');
      fs.symlinkSync(elsewhere, stagingLink);
      const st = await errorOf(
        env.node.call('nodeStageVolume', {
          volumeId: other,
          stagingTargetPath: stagingLink,
          volumeCapability: mountCap(),
        }),
      );
      expect([status.INVALID_ARGUMENT, status.FAILED_PRECONDITION]).toContain(st.code);
      expect(st.details).toContain(stagingLink);
      expect(isMounted(elsewhere) || isMounted(stagingLink)).toBe(false);
      expect(await codeOf(env.controller.call('deleteVolume', { volumeId: vol }))).toBe(status.OK);
    });

    it('NodeUnpublishVolume: a target the volume was never published at is OK and left untouched (empty file, empty directory)', async () => {
      const { vol, staging } = await staged('own-unknown', mountCap());
      const emptyFile = targetPath('own-unknown-file');
      fs.writeFileSync(emptyFile, '');
      const emptyDir = targetPath('own-unknown-dir');
      fs.mkdirSync(emptyDir);
      for (const target of [emptyFile, emptyDir])
        await env.node.call('nodeUnpublishVolume', { volumeId: vol, targetPath: target });
      expect(fs.existsSync(emptyFile) && fs.existsSync(emptyDir)).toBe(true);
      await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging });
      // Not staged at all: the same.
      for (const target of [emptyFile, emptyDir])
        await env.node.call('nodeUnpublishVolume', { volumeId: vol, targetPath: target });
      expect(fs.existsSync(emptyFile) && fs.existsSync(emptyDir)).toBe(true);
    });

    it('NodeUnpublishVolume: a target that still holds files after the unmount is unpublished (OK), the files are left alone, and unstage and DeleteVolume still work', async () => {
      const { vol, staging } = await staged('own-leftover', mountCap());
      const target = targetPath('own-leftover');
      await env.node.call('nodePublishVolume', {
        volumeId: vol,
        stagingTargetPath: staging,
        targetPath: target,
        volumeCapability: mountCap(),
      });
      // Something else takes the mount down and writes into the bare directory.
      sh('umount', [target]);
      fs.writeFileSync(`${target}/left-behind`, "not the driver's");
      await env.node.call('nodeUnpublishVolume', { volumeId: vol, targetPath: target });
      expect(fs.readFileSync(`${target}/left-behind`, 'utf8')).toBe("not the driver's");
      await env.node.call('nodeUnpublishVolume', { volumeId: vol, targetPath: target });
      await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging });
      await env.controller.call('deleteVolume', { volumeId: vol });
    });

    it('NodeStageVolume (mount): a non-empty staging directory or a file is FAILED_PRECONDITION naming the path, and nothing is mounted over it', async () => {
      const vol = await createVolume(16 * MiB);
      const dir = stagingDir('own-staging-full');
      fs.writeFileSync(`${dir}/keep`, 'keep me');
      const file = env.path('staging', 'own-staging-file');
      fs.writeFileSync(file, '');
      for (const stagingPath of [dir, file]) {
        const res = await errorOf(
          env.node.call('nodeStageVolume', {
            volumeId: vol,
            stagingTargetPath: stagingPath,
            volumeCapability: mountCap(),
          }),
        );
        expect(res.code, stagingPath).toBe(status.FAILED_PRECONDITION);
        expect(res.details).toContain(stagingPath);
        expect(isMounted(stagingPath)).toBe(false);
      }
      expect(fs.readFileSync(`${dir}/keep`, 'utf8')).toBe('keep me');
      // Refused stages leave nothing staged: the volume can be deleted.
      await env.controller.call('deleteVolume', { volumeId: vol });
    });

    it('NodeStageVolume (mount): an absent staging path is created and removed at unstage; a directory the CO made is left in place', async () => {
      const vol = await createVolume(16 * MiB);
      fs.mkdirSync(env.path('staging'), { recursive: true });
      const absent = env.path('staging', 'own-staging-absent');
      await env.node.call('nodeStageVolume', {
        volumeId: vol,
        stagingTargetPath: absent,
        volumeCapability: mountCap(),
      });
      expect(isMounted(absent)).toBe(true);
      await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: absent });
      expect(fs.existsSync(absent)).toBe(false);
      const made = stagingDir('own-staging-made');
      await env.node.call('nodeStageVolume', { volumeId: vol, stagingTargetPath: made, volumeCapability: mountCap() });
      await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: made });
      expect(fs.statSync(made).isDirectory()).toBe(true);
    });
  });

  describe('NodeGetVolumeStats', () => {
    it('NodeGetVolumeStats (mount): bytes and inodes of the filesystem at the staging path and the target, and a normal condition', async () => {
      const vol = await createVolume(64 * MiB);
      const staging = stagingDir('s-mount');
      const target = targetPath('s-mount');
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
      for (const volumePath of [staging, target]) {
        const res = await env.node.call('nodeGetVolumeStats', {
          volumeId: vol,
          volumePath,
          stagingTargetPath: staging,
        });
        const st = fs.statfsSync(volumePath);
        const bytes = res.usage.find((u) => u.unit === VolumeUsage_Unit.BYTES)!;
        const inodes = res.usage.find((u) => u.unit === VolumeUsage_Unit.INODES)!;
        expect(bytes.total).toBe(BigInt(st.blocks * st.bsize));
        expect(bytes.total).toBeLessThanOrEqual(BigInt(64 * MiB));
        expect(bytes.used + bytes.available).toBeLessThanOrEqual(bytes.total);
        expect(inodes.total).toBe(BigInt(st.files));
        expect(res.volumeCondition?.abnormal).toBe(false);
      }
      await env.node.call('nodeUnpublishVolume', { volumeId: vol, targetPath: target });
      await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging });
    });

    it('NodeGetVolumeStats (block): the total bytes are the volume capacity', async () => {
      const vol = await createVolume(24 * MiB);
      const staging = stagingDir('s-block');
      await env.node.call('nodeStageVolume', {
        volumeId: vol,
        stagingTargetPath: staging,
        volumeCapability: blockCap(),
      });
      const res = await env.node.call('nodeGetVolumeStats', { volumeId: vol, volumePath: staging });
      expect(res.usage.map((u) => [u.unit, u.total])).toEqual([[VolumeUsage_Unit.BYTES, BigInt(24 * MiB)]]);
      expect(res.volumeCondition?.abnormal).toBe(false);
      await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging });
    });

    it('NodeGetVolumeStats: an unknown volume, or a path where the volume is not (a relative one included), is NOT_FOUND; missing fields are INVALID_ARGUMENT', async () => {
      const vol = await createVolume();
      expect(
        await codeOf(
          env.node.call('nodeGetVolumeStats', { volumeId: 'vol-00000000000000fc', volumePath: stagingDir('s-x') }),
        ),
      ).toBe(status.NOT_FOUND);
      expect(await codeOf(env.node.call('nodeGetVolumeStats', { volumeId: vol, volumePath: stagingDir('s-x') }))).toBe(
        status.NOT_FOUND,
      );
      expect(await codeOf(env.node.call('nodeGetVolumeStats', { volumeId: vol }))).toBe(status.INVALID_ARGUMENT);
      expect(await codeOf(env.node.call('nodeGetVolumeStats', { volumePath: stagingDir('s-x') }))).toBe(
        status.INVALID_ARGUMENT,
      );
      expect(await codeOf(env.node.call('nodeGetVolumeStats', { volumeId: vol, volumePath: 'some/path' }))).toBe(
        status.NOT_FOUND,
      );
      expect(
        await codeOf(
          env.node.call('nodeGetVolumeStats', { volumeId: 'vol-00000000000000fc', volumePath: 'some/path' }),
        ),
      ).toBe(status.NOT_FOUND);
    });
  });

  describe('NodeExpandVolume', () => {
    for (const fsType of ['ext4', 'xfs']) {
      it(`NodeExpandVolume (${fsType}): after ControllerExpandVolume, the device and the mounted filesystem grow; capacity_bytes is the new size`, async () => {
        const vol = await createVolume(320 * MiB);
        const staging = stagingDir(`e-${fsType}`);
        await env.node.call('nodeStageVolume', {
          volumeId: vol,
          stagingTargetPath: staging,
          volumeCapability: mountCap(fsType),
        });
        const before = fs.statfsSync(staging);
        await env.controller.call('controllerExpandVolume', {
          volumeId: vol,
          capacityRange: { requiredBytes: BigInt(640 * MiB) },
          volumeCapability: mountCap(fsType),
        });
        const res = await env.node.call('nodeExpandVolume', {
          volumeId: vol,
          volumePath: staging,
          stagingTargetPath: staging,
          capacityRange: { requiredBytes: BigInt(640 * MiB) },
          volumeCapability: mountCap(fsType),
        });
        expect(res.capacityBytes).toBe(BigInt(640 * MiB));
        const after = fs.statfsSync(staging);
        expect(after.blocks * after.bsize).toBeGreaterThan(before.blocks * before.bsize + 256 * MiB);
        expect(Number(sh('blockdev', ['--getsize64', mountAt(staging)!.source]).trim())).toBe(640 * MiB);
        await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging });
      });
    }

    it('NodeExpandVolume (ext4, published): grows online with CAP_SYS_RESOURCE; without it, FAILED_PRECONDITION (volume in use) and nothing changes', async () => {
      const vol = await createVolume(64 * MiB);
      const staging = stagingDir('e-published');
      const target = targetPath('e-published');
      await env.node.call('nodeStageVolume', {
        volumeId: vol,
        stagingTargetPath: staging,
        volumeCapability: mountCap('ext4'),
      });
      await env.node.call('nodePublishVolume', {
        volumeId: vol,
        stagingTargetPath: staging,
        targetPath: target,
        volumeCapability: mountCap('ext4'),
      });
      const before = fs.statfsSync(target);
      await env.controller.call('controllerExpandVolume', {
        volumeId: vol,
        capacityRange: { requiredBytes: BigInt(128 * MiB) },
      });
      const expand = env.node.call('nodeExpandVolume', {
        volumeId: vol,
        volumePath: target,
        stagingTargetPath: staging,
      });
      if (hasCapability(CAP_SYS_RESOURCE)) {
        expect((await expand).capacityBytes).toBe(BigInt(128 * MiB));
        expect(fs.statfsSync(target).blocks).toBeGreaterThan(before.blocks);
      } else {
        expect(await codeOf(expand)).toBe(status.FAILED_PRECONDITION);
        expect(fs.statfsSync(target).blocks).toBe(before.blocks);
        expect(isMounted(target) && isMounted(staging)).toBe(true);
      }
      await env.node.call('nodeUnpublishVolume', { volumeId: vol, targetPath: target });
      await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging });
    });

    it('NodeExpandVolume (block): the device takes the new capacity', async () => {
      const vol = await createVolume(16 * MiB);
      const staging = stagingDir('e-block');
      await env.node.call('nodeStageVolume', {
        volumeId: vol,
        stagingTargetPath: staging,
        volumeCapability: blockCap(),
      });
      await env.controller.call('controllerExpandVolume', {
        volumeId: vol,
        capacityRange: { requiredBytes: BigInt(48 * MiB) },
      });
      const res = await env.node.call('nodeExpandVolume', {
        volumeId: vol,
        volumePath: staging,
        volumeCapability: blockCap(),
      });
      expect(res.capacityBytes).toBe(BigInt(48 * MiB));
      const device = loopDevicesUnder(env.stateDir).find((d) => d.backFile.endsWith(`/${vol}`))!.name;
      expect(Number(sh('blockdev', ['--getsize64', device]).trim())).toBe(48 * MiB);
      await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging });
    });

    it('NodeExpandVolume: more than the volume has is OUT_OF_RANGE, a path where it is not staged NOT_FOUND, missing fields INVALID_ARGUMENT', async () => {
      const vol = await createVolume(16 * MiB);
      const staging = stagingDir('e-bad');
      await env.node.call('nodeStageVolume', {
        volumeId: vol,
        stagingTargetPath: staging,
        volumeCapability: blockCap(),
      });
      expect(
        await codeOf(
          env.node.call('nodeExpandVolume', {
            volumeId: vol,
            volumePath: staging,
            capacityRange: { requiredBytes: BigInt(32 * MiB) },
          }),
        ),
      ).toBe(status.OUT_OF_RANGE);
      expect(
        await codeOf(env.node.call('nodeExpandVolume', { volumeId: vol, volumePath: stagingDir('e-elsewhere') })),
      ).toBe(status.NOT_FOUND);
      expect(
        await codeOf(env.node.call('nodeExpandVolume', { volumeId: 'vol-00000000000000fb', volumePath: staging })),
      ).toBe(status.NOT_FOUND);
      expect(
        await codeOf(env.node.call('nodeExpandVolume', { volumeId: 'vol-00000000000000fb', volumePath: 'some/path' })),
      ).toBe(status.NOT_FOUND);
      expect(await codeOf(env.node.call('nodeExpandVolume', { volumeId: vol }))).toBe(status.INVALID_ARGUMENT);
      expect(
        await codeOf(
          env.node.call('nodeExpandVolume', {
            volumeId: vol,
            volumePath: staging,
            volumeCapability: blockCap(MULTI_NODE_MULTI_WRITER),
          }),
        ),
      ).toBe(status.INVALID_ARGUMENT);
      await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging });
    });
  });

  describe('read-only staging', () => {
    it('NodeStageVolume (SINGLE_NODE_READER_ONLY): the filesystem is mounted read-only on a read-only device', async () => {
      const vol = await createVolume();
      const staging = stagingDir('ro-stage');
      // Formatted once writable, then staged for reading only.
      await env.node.call('nodeStageVolume', {
        volumeId: vol,
        stagingTargetPath: staging,
        volumeCapability: mountCap(),
      });
      fs.writeFileSync(`${staging}/data`, 'written before');
      await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging });
      await env.node.call('nodeStageVolume', {
        volumeId: vol,
        stagingTargetPath: staging,
        volumeCapability: mountCap('', SINGLE_NODE_READER_ONLY),
      });
      expect(fs.readFileSync(`${staging}/data`, 'utf8')).toBe('written before');
      expect(() => fs.writeFileSync(`${staging}/more`, 'x')).toThrow(/EROFS/);
      expect(loopDevicesUnder(env.stateDir).find((d) => d.backFile.endsWith(`/${vol}`))?.ro).toBe(true);
      await env.node.call('nodeUnstageVolume', { volumeId: vol, stagingTargetPath: staging });
    });
  });
});

// Needs no root: the data plane is only mounted when a volume is staged.
describe('--role', () => {
  it('role controller serves Identity, Controller and SnapshotMetadata; Node calls are UNIMPLEMENTED', async () => {
    const d = await startTestDriver({ role: 'controller' });
    const node = new ServiceClient(Node, d.target);
    try {
      expect(await codeOf(node.call('nodeGetInfo', {}))).toBe(status.UNIMPLEMENTED);
      expect((await d.controller.call('controllerGetCapabilities', {})).capabilities.length).toBeGreaterThan(0);
    } finally {
      node.close();
      await d.stop();
    }
  });

  it('role node serves Identity and Node; Controller calls are UNIMPLEMENTED', async () => {
    const d = await startTestDriver({ role: 'node', nodeId: 'node-7' });
    const node = new ServiceClient(Node, d.target);
    const controller = new ServiceClient(Controller, d.target);
    try {
      expect((await node.call('nodeGetInfo', {})).nodeId).toBe('node-7');
      expect(await codeOf(controller.call('controllerGetCapabilities', {}))).toBe(status.UNIMPLEMENTED);
      expect((await d.identity.call('getPluginInfo', {})).name).toBe('cbt.csi.dev');
    } finally {
      node.close();
      controller.close();
      await d.stop();
    }
  });
});
