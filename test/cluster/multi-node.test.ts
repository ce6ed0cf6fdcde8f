/**
 * Multi-node mode (docs/adr/0008), with three real driver processes as three nodes: separate state
 * directories and node IDs, peer listeners on loopback, mutual TLS from a test CA. Each node holds volumes
 * and snapshots with data of its own; every node must answer for every node's objects exactly as the owner
 * does, pass the owner's errors through unchanged, refuse peers without a valid certificate, and report a
 * dead owner as UNAVAILABLE until it is back.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { connectCsiDirect, type Extent } from '../../src/client/index.js';
import { PEER_TLS_NAME } from '../../src/cluster/peer-tls.js';
import { decodeMetadataResponse } from '../../src/client/metadata-wire.js';
import { Identity, type SnapshotMetadata, VolumeCapability_AccessMode_Mode } from '../../src/gen/csi/v1/csi_pb.js';
import { type RpcError, ServiceClient } from '../support/csi-client.js';
import { makePeerCerts, missingOpenssl, type PeerCerts } from '../support/peer-certs.js';
import { type Cluster, type ClusterNode, startCluster, writeBlocks } from './support/cluster-nodes.js';

const BLOCK = 4096;
const MiB = 1024 * 1024;
const NODE_IDS = ['node-a', 'node-b', 'node-c'] as const;
const BLOCK_CAPABILITY = {
  accessType: { case: 'block' as const, value: {} },
  accessMode: { mode: VolumeCapability_AccessMode_Mode.SINGLE_NODE_WRITER },
};

/** What one node holds: a volume with a base and a target snapshot, and which blocks changed between them. */
interface NodeData {
  owner: ClusterNode;
  volume: string;
  style: 'FIXED' | 'VARIABLE';
  base: string;
  target: string;
  /** Blocks written after the base (and so allocated in the target, which has nothing else). */
  changed: number[];
  /** A second, unrelated volume's snapshot on the same node. */
  unrelated: string;
}

/** A long FIXED stream on node-c (back-pressure, and a stream cut by its owner's death): every block of 64 MiB changed. */
interface LongStream {
  base: string;
  target: string;
  tuples: number;
}

function suite(name: string, body: () => void): void {
  const missing = missingOpenssl();
  if (!missing) describe(name, body);
  else if (process.env.CI === 'true') {
    describe(name, () =>
      it(`has what it needs (CI=true): ${missing}`, () => {
        throw new Error(missing);
      }),
    );
  } else describe.skip(`${name} — skipped: ${missing}`, body);
}

/** Expected extents of a set of blocks: one per block (FIXED) or one per run of adjacent blocks (VARIABLE). */
function expectedExtents(blocks: readonly number[], style: 'FIXED' | 'VARIABLE'): Extent[] {
  const sorted = [...blocks].sort((a, b) => a - b);
  const out: Extent[] = [];
  for (const b of sorted) {
    const last = out[out.length - 1];
    if (style === 'VARIABLE' && last && last.offset + last.length === b * BLOCK) last.length += BLOCK;
    else out.push({ offset: b * BLOCK, length: BLOCK });
  }
  return out;
}

/** A metadata stream as raw messages (the bytes on the wire), through grpc-js. */
async function rawStream(
  client: ServiceClient<typeof SnapshotMetadata>,
  request:
    | { kind: 'allocated'; snapshotId: string; startingOffset?: bigint; maxResults?: number }
    | { kind: 'delta'; baseSnapshotId: string; targetSnapshotId: string; startingOffset?: bigint; maxResults?: number },
): Promise<Buffer[]> {
  const call =
    request.kind === 'allocated'
      ? client.streamRaw('getMetadataAllocated', request)
      : client.streamRaw('getMetadataDelta', request);
  const messages: Buffer[] = [];
  for await (const message of call) messages.push(message as Buffer);
  return messages;
}

function extentsOf(messages: readonly Buffer[]): Extent[] {
  const out: Extent[] = [];
  for (const m of messages) {
    const { tuples } = decodeMetadataResponse(m);
    for (let i = 0; i < tuples.length; i += 2) out.push({ offset: tuples[i]!, length: tuples[i + 1]! });
  }
  return out;
}

/** The status a call ended with: code and message as grpc-js reports them. */
async function statusOf(promise: Promise<unknown>): Promise<{ code: number; details: string }> {
  try {
    await promise;
    return { code: grpc.status.OK, details: '' };
  } catch (err) {
    return { code: (err as RpcError).code, details: (err as RpcError).details };
  }
}

/** The percent-escapes grpc-js leaves in (it decodes with decodeURI), undone for reading. */
function readable(details: string): string {
  return decodeURIComponent(details);
}

async function peerStreamMessages(node: ClusterNode, peer: string): Promise<number> {
  const text = await (await fetch(node.metricsUrl())).text();
  const m = new RegExp(`^cbt_csi_peer_messages_received_total\\{peer="${peer}"\\} (\\d+)`, 'm').exec(text);
  return m ? Number(m[1]) : 0;
}

suite('multi-node: three driver processes as three nodes', () => {
  let dir: string;
  let certs: PeerCerts;
  let cluster: Cluster;
  let nodes: ClusterNode[];
  const data = new Map<string, NodeData>();
  let long: LongStream;

  const byId = (id: string) => nodes.find((n) => n.id === id)!;

  beforeAll(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-multi-node-'));
    certs = makePeerCerts(path.join(dir, 'certs'));
    cluster = await startCluster(dir, NODE_IDS, certs.valid);
    nodes = cluster.nodes;

    // Volumes and base snapshots through CSI, on each node's own socket.
    const created: Array<{
      owner: ClusterNode;
      volume: string;
      base: string;
      unrelated: string;
      style: NodeData['style'];
    }> = [];
    for (const [i, owner] of nodes.entries()) {
      const style = i === 1 ? 'FIXED' : 'VARIABLE';
      const make = async (name: string) =>
        (
          await owner.controller.call('createVolume', {
            name: `${owner.id}-${name}`,
            capacityRange: { requiredBytes: BigInt(64 * MiB) },
            volumeCapabilities: [BLOCK_CAPABILITY],
            parameters: { metadataStyle: style, blockSize: String(BLOCK) },
          })
        ).volume!.volumeId;
      const volume = await make('data');
      const other = await make('other');
      const base = (await owner.controller.call('createSnapshot', { sourceVolumeId: volume, name: `${owner.id}-base` }))
        .snapshot!.snapshotId;
      const unrelated = (
        await owner.controller.call('createSnapshot', { sourceVolumeId: other, name: `${owner.id}-other` })
      ).snapshot!.snapshotId;
      created.push({ owner, volume, base, unrelated, style });
    }
    const longVolume = (
      await nodes[2]!.controller.call('createVolume', {
        name: 'node-c-long',
        capacityRange: { requiredBytes: BigInt(128 * MiB) },
        volumeCapabilities: [BLOCK_CAPABILITY],
        parameters: { metadataStyle: 'FIXED', blockSize: String(BLOCK) },
      })
    ).volume!.volumeId;
    const longBase = (
      await nodes[2]!.controller.call('createSnapshot', { sourceVolumeId: longVolume, name: 'long-base' })
    ).snapshot!.snapshotId;

    // Writes go into the stores while the drivers are stopped (no root or loop devices needed), then the
    // drivers start again on the same state.
    await Promise.all(nodes.map((n) => n.kill('SIGTERM')));
    const changedOf = (i: number) => [
      3 + i,
      4 + i,
      5 + i,
      100 * (i + 1),
      ...Array.from({ length: 300 }, (_, k) => 2000 + 7 * i + k),
      ...Array.from({ length: 50 }, (_, k) => 5000 + 2 * k),
    ];
    for (const [i, c] of created.entries()) {
      const changed = changedOf(i);
      const block = Buffer.alloc(BLOCK, i + 1);
      await writeBlocks(
        c.owner.stateDir,
        c.volume.split('@')[0]!,
        changed.map((b) => ({ offset: b * BLOCK, data: block })),
      );
      data.set(c.owner.id, { ...c, target: '', changed });
    }
    await writeBlocks(nodes[2]!.stateDir, longVolume.split('@')[0]!, [{ offset: 0, data: Buffer.alloc(64 * MiB, 7) }]);
    await Promise.all(nodes.map((n) => n.start()));
    for (const d of data.values()) {
      d.target = (
        await d.owner.controller.call('createSnapshot', { sourceVolumeId: d.volume, name: `${d.owner.id}-target` })
      ).snapshot!.snapshotId;
    }
    const longTarget = (
      await nodes[2]!.controller.call('createSnapshot', { sourceVolumeId: longVolume, name: 'long-target' })
    ).snapshot!.snapshotId;
    long = { base: longBase, target: longTarget, tuples: (64 * MiB) / BLOCK };
  }, 900_000);

  afterAll(async () => {
    await cluster?.stop();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  }, 120_000);

  it('hands out handles that name the owning node, with that node as the topology', async () => {
    for (const d of data.values()) {
      for (const handle of [d.volume, d.base, d.target, d.unrelated])
        expect(handle.endsWith(`@${d.owner.id}`)).toBe(true);
      const volume = await d.owner.controller.call('controllerGetVolume', { volumeId: d.volume });
      expect(volume.volume!.volumeId).toBe(d.volume);
      expect(volume.volume!.accessibleTopology[0]!.segments).toEqual({ 'topology.cbt.csi.dev/node': d.owner.id });
    }
  });

  it("every node answers GetMetadataAllocated and GetMetadataDelta for every node's snapshots with the owner's exact bytes (grpc-js)", async () => {
    for (const d of data.values()) {
      const allocated = await rawStream(d.owner.metadata, { kind: 'allocated', snapshotId: d.target });
      const delta = await rawStream(d.owner.metadata, {
        kind: 'delta',
        baseSnapshotId: d.base,
        targetSnapshotId: d.target,
      });
      // The owner's own answer is the written set (so the comparisons below compare something).
      expect(extentsOf(allocated)).toEqual(expectedExtents(d.changed, d.style));
      expect(extentsOf(delta)).toEqual(expectedExtents(d.changed, d.style));
      const paged = { kind: 'delta' as const, baseSnapshotId: d.base, targetSnapshotId: d.target, maxResults: 7 };
      const ownerPaged = await rawStream(d.owner.metadata, paged);
      const fromOffset = { kind: 'allocated' as const, snapshotId: d.target, startingOffset: BigInt(2100 * BLOCK) };
      const ownerFromOffset = await rawStream(d.owner.metadata, fromOffset);
      for (const asker of nodes) {
        expect(
          await rawStream(asker.metadata, { kind: 'allocated', snapshotId: d.target }),
          `${asker.id} → ${d.owner.id}`,
        ).toEqual(allocated);
        expect(
          await rawStream(asker.metadata, { kind: 'delta', baseSnapshotId: d.base, targetSnapshotId: d.target }),
        ).toEqual(delta);
        expect(await rawStream(asker.metadata, paged)).toEqual(ownerPaged);
        expect(await rawStream(asker.metadata, fromOffset)).toEqual(ownerFromOffset);
      }
    }
  });

  it("every node answers every node's snapshots exactly through the cbt-csi client library", async () => {
    for (const d of data.values()) {
      const expected = expectedExtents(d.changed, d.style);
      for (const asker of nodes) {
        const client = connectCsiDirect(asker.target);
        try {
          const delta = await client.delta(d.base, d.target);
          const extents: Extent[] = [];
          for await (const e of delta) extents.push({ offset: e.offset, length: e.length });
          expect(extents, `${asker.id} → ${d.owner.id}`).toEqual(expected);
          expect(delta.capacityBytes).toBe(64 * MiB);
          const allocated: Extent[] = [];
          for await (const e of await client.allocated(d.target, { blockSize: 1 << 20 })) {
            allocated.push({ offset: e.offset, length: e.length });
          }
          const owner = connectCsiDirect(d.owner.target);
          const ownerAllocated: Extent[] = [];
          for await (const e of await owner.allocated(d.target, { blockSize: 1 << 20 })) {
            ownerAllocated.push({ offset: e.offset, length: e.length });
          }
          await owner.close();
          expect(allocated).toEqual(ownerAllocated);
        } finally {
          await client.close();
        }
      }
    }
  });

  it("passes the owner's errors through unchanged: code and message", async () => {
    const a = byId('node-a');
    const b = data.get('node-b')!;
    const cases: Array<{ what: string; call: (m: ServiceClient<typeof SnapshotMetadata>) => Promise<unknown> }> = [
      {
        what: 'NOT_FOUND: an unknown snapshot of node-b',
        call: (m) => rawStream(m, { kind: 'allocated', snapshotId: 'snap-0000000000000000@node-b' }),
      },
      {
        what: 'OUT_OF_RANGE: starting_offset past the capacity',
        call: (m) => rawStream(m, { kind: 'allocated', snapshotId: b.target, startingOffset: BigInt(65 * MiB) }),
      },
      {
        what: "INVALID_ARGUMENT: snapshots of two different volumes (the engine's refusal)",
        call: (m) => rawStream(m, { kind: 'delta', baseSnapshotId: b.unrelated, targetSnapshotId: b.target }),
      },
      {
        what: 'INVALID_ARGUMENT: a negative max_results',
        call: (m) =>
          rawStream(m, { kind: 'delta', baseSnapshotId: b.base, targetSnapshotId: b.target, maxResults: -1 }),
      },
    ];
    const expectedCodes = [
      grpc.status.NOT_FOUND,
      grpc.status.OUT_OF_RANGE,
      grpc.status.INVALID_ARGUMENT,
      grpc.status.INVALID_ARGUMENT,
    ];
    for (const [i, c] of cases.entries()) {
      const direct = await statusOf(c.call(b.owner.metadata));
      const forwarded = await statusOf(c.call(a.metadata));
      expect(direct.code, c.what).toBe(expectedCodes[i]);
      expect(forwarded, c.what).toEqual(direct);
    }
    // The client library decodes status messages fully: the owner's message arrives byte for byte (this one
    // has a ':', which grpc-js leaves percent-encoded).
    const direct = connectCsiDirect(b.owner.target);
    const via = connectCsiDirect(a.target);
    try {
      const failures = [
        (client: ReturnType<typeof connectCsiDirect>) => client.allocated(b.target, { startingOffset: 65 * MiB }),
        (client: ReturnType<typeof connectCsiDirect>) => client.delta(b.target, b.base),
      ];
      for (const [i, fail] of failures.entries()) {
        const errorOf = (client: ReturnType<typeof connectCsiDirect>) =>
          fail(client).then(
            () => undefined,
            (err: unknown) => err as { name: string; code: string; driverMessage: string },
          );
        const ownerError = await errorOf(direct);
        expect(ownerError).toMatchObject(
          i === 0 ? { name: 'OutOfRangeError', code: 'OUT_OF_RANGE' } : { name: 'InvalidArgumentError' },
        );
        const viaError = await errorOf(via);
        expect(viaError?.name).toBe(ownerError!.name);
        expect(viaError?.driverMessage).toBe(ownerError!.driverMessage);
      }
      const reversed = await direct.delta(b.target, b.base).then(
        () => '',
        (e: { driverMessage: string }) => e.driverMessage,
      );
      expect(reversed).toContain(':');
    } finally {
      await direct.close();
      await via.close();
    }
  });

  it('forwards controller calls to the owner: snapshots, expansion, restores, clones, groups, deletes', async () => {
    const a = byId('node-a');
    const c = data.get('node-c')!;
    // CreateSnapshot through node-a, of node-c's volume: made in node-c's store.
    const snap = (await a.controller.call('createSnapshot', { sourceVolumeId: c.volume, name: 'via-a' })).snapshot!;
    expect(snap.snapshotId.endsWith('@node-c')).toBe(true);
    expect(snap.sourceVolumeId).toBe(c.volume);
    const listed = await c.owner.controller.call('listSnapshots', { snapshotId: snap.snapshotId });
    expect(listed.entries.map((e) => e.snapshot!.snapshotId)).toEqual([snap.snapshotId]);
    expect(
      (await byId('node-b').controller.call('listSnapshots', { snapshotId: snap.snapshotId })).entries,
    ).toHaveLength(1);
    // Idempotent by name through any node.
    const again = (await byId('node-b').controller.call('createSnapshot', { sourceVolumeId: c.volume, name: 'via-a' }))
      .snapshot!;
    expect(again.snapshotId).toBe(snap.snapshotId);

    // ControllerExpandVolume through node-a.
    const grown = await a.controller.call('controllerExpandVolume', {
      volumeId: c.volume,
      capacityRange: { requiredBytes: BigInt(80 * MiB) },
    });
    expect(grown.capacityBytes).toBe(BigInt(80 * MiB));
    expect((await c.owner.controller.call('controllerGetVolume', { volumeId: c.volume })).volume!.capacityBytes).toBe(
      BigInt(80 * MiB),
    );

    // A restore asked of node-b lands on node-c, where the snapshot's data is, and holds that data.
    const allTopologies = NODE_IDS.map((id) => ({ segments: { 'topology.cbt.csi.dev/node': id } }));
    const restored = (
      await byId('node-b').controller.call('createVolume', {
        name: 'restore-of-c',
        volumeCapabilities: [BLOCK_CAPABILITY],
        volumeContentSource: { type: { case: 'snapshot', value: { snapshotId: c.target } } },
        accessibilityRequirements: { requisite: allTopologies, preferred: [allTopologies[1]!] },
      })
    ).volume!;
    expect(restored.volumeId.endsWith('@node-c')).toBe(true);
    expect(restored.accessibleTopology[0]!.segments).toEqual({ 'topology.cbt.csi.dev/node': 'node-c' });
    expect(restored.contentSource?.type).toEqual({
      case: 'snapshot',
      value: expect.objectContaining({ snapshotId: c.target }),
    });
    const restoredSnap = (
      await a.controller.call('createSnapshot', { sourceVolumeId: restored.volumeId, name: 'restored-snap' })
    ).snapshot!;
    expect(extentsOf(await rawStream(a.metadata, { kind: 'allocated', snapshotId: restoredSnap.snapshotId }))).toEqual(
      expectedExtents(c.changed, c.style),
    );
    // A clone asked of node-a lands on node-c too.
    const clone = (
      await a.controller.call('createVolume', {
        name: 'clone-of-c',
        volumeCapabilities: [BLOCK_CAPABILITY],
        volumeContentSource: { type: { case: 'volume', value: { volumeId: c.volume } } },
      })
    ).volume!;
    expect(clone.volumeId.endsWith('@node-c')).toBe(true);

    // A group snapshot of node-c's volumes asked of node-a is taken on node-c.
    const group = (
      await a.groups.call('createVolumeGroupSnapshot', { name: 'group-c', sourceVolumeIds: [c.volume, clone.volumeId] })
    ).groupSnapshot!;
    expect(group.groupSnapshotId.endsWith('@node-c')).toBe(true);
    expect(
      group.snapshots.every((s) => s.snapshotId.endsWith('@node-c') && s.groupSnapshotId === group.groupSnapshotId),
    ).toBe(true);
    await byId('node-b').groups.call('deleteVolumeGroupSnapshot', { groupSnapshotId: group.groupSnapshotId });
    expect(
      (await statusOf(c.owner.groups.call('getVolumeGroupSnapshot', { groupSnapshotId: group.groupSnapshotId }))).code,
    ).toBe(grpc.status.NOT_FOUND);

    // Deletes through a non-owner reach the owner.
    await a.controller.call('deleteSnapshot', { snapshotId: restoredSnap.snapshotId });
    await a.controller.call('deleteVolume', { volumeId: restored.volumeId });
    await byId('node-b').controller.call('deleteVolume', { volumeId: clone.volumeId });
    for (const volumeId of [restored.volumeId, clone.volumeId]) {
      expect((await statusOf(c.owner.controller.call('controllerGetVolume', { volumeId }))).code).toBe(
        grpc.status.NOT_FOUND,
      );
    }
    expect((await c.owner.controller.call('listSnapshots', { snapshotId: restoredSnap.snapshotId })).entries).toEqual(
      [],
    );
  });

  it('refuses requests naming objects of two nodes, and Node calls for a volume of another node', async () => {
    const a = byId('node-a');
    const mixed = await statusOf(
      rawStream(a.metadata, {
        kind: 'delta',
        baseSnapshotId: data.get('node-b')!.base,
        targetSnapshotId: data.get('node-c')!.target,
      }),
    );
    expect(mixed.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(readable(mixed.details)).toMatch(/nodes node-b, node-c/);
    const mixedGroup = await statusOf(
      a.groups.call('createVolumeGroupSnapshot', {
        name: 'mixed',
        sourceVolumeIds: [data.get('node-a')!.volume, data.get('node-b')!.volume],
      }),
    );
    expect(mixedGroup.code).toBe(grpc.status.INVALID_ARGUMENT);
    const stats = await statusOf(
      a.node.call('nodeGetVolumeStats', { volumeId: data.get('node-b')!.volume, volumePath: '/tmp/anything' }),
    );
    expect(stats.code).toBe(grpc.status.NOT_FOUND);
    expect(readable(stats.details)).toMatch(/is on node node-b/);
  });

  it('serves handles without an owner (single-mode and older stores) on the node that receives them', async () => {
    const b = data.get('node-b')!;
    const bare = b.target.split('@')[0]!;
    expect(await rawStream(b.owner.metadata, { kind: 'allocated', snapshotId: bare })).toEqual(
      await rawStream(b.owner.metadata, { kind: 'allocated', snapshotId: b.target }),
    );
    expect((await statusOf(rawStream(byId('node-a').metadata, { kind: 'allocated', snapshotId: bare }))).code).toBe(
      grpc.status.NOT_FOUND,
    );
  });

  it('answers UNAVAILABLE, naming the node, for a node no driver is known for', async () => {
    const status = await statusOf(
      rawStream(byId('node-a').metadata, { kind: 'allocated', snapshotId: 'snap-0000000000000000@node-z' }),
    );
    expect(status.code).toBe(grpc.status.UNAVAILABLE);
    expect(readable(status.details)).toMatch(/node node-z/);
  });

  it("streams through a non-owner one message at a time: a stalled reader stops the forwarder's reads from the owner", async () => {
    const b = byId('node-b');
    const before = await peerStreamMessages(b, 'node-c');
    // One tuple a message: 16384 small messages, far more than the HTTP/2 windows and buffers in between hold.
    const call = b.metadata.streamRaw('getMetadataDelta', {
      baseSnapshotId: long.base,
      targetSnapshotId: long.target,
      maxResults: 1,
    });
    const received: Buffer[] = [];
    await new Promise<void>((resolve, reject) => {
      call.once('error', reject);
      call.once('data', (m: Buffer) => {
        received.push(m);
        call.pause();
        resolve();
      });
    });
    // Let the buffers between the client and the forwarder fill, until the forwarder stops reading.
    let read = await peerStreamMessages(b, 'node-c');
    for (;;) {
      await new Promise((r) => setTimeout(r, 1000));
      const now = await peerStreamMessages(b, 'node-c');
      if (now === read) break;
      read = now;
    }
    const readWhileStalled = read - before;
    expect(readWhileStalled).toBeGreaterThan(0);
    expect(readWhileStalled).toBeLessThan(long.tuples / 4);
    // Resumed, the rest arrives, exactly.
    await new Promise<void>((resolve, reject) => {
      call.on('data', (m: Buffer) => received.push(m));
      call.once('error', reject);
      call.once('end', resolve);
      call.resume();
    });
    const extents = extentsOf(received);
    expect(extents).toHaveLength(long.tuples);
    expect(extents[long.tuples - 1]).toEqual({ offset: (long.tuples - 1) * BLOCK, length: BLOCK });
    expect((await peerStreamMessages(b, 'node-c')) - before).toBe(long.tuples);
  });

  describe('mutual TLS on the peer listener', () => {
    const peerClient = (port: number, credentials: grpc.ChannelCredentials) =>
      new ServiceClient(
        Identity,
        `127.0.0.1:${port}`,
        {
          'grpc.ssl_target_name_override': PEER_TLS_NAME,
          'grpc.default_authority': PEER_TLS_NAME,
        },
        credentials,
      );

    it('answers a peer with a certificate from the peer CA', async () => {
      const a = byId('node-a');
      const pem = (f: string) => fs.readFileSync(f);
      const client = peerClient(
        a.peerPort,
        grpc.credentials.createSsl(pem(certs.valid.ca), pem(certs.valid.key), pem(certs.valid.cert)),
      );
      try {
        expect((await client.call('getPluginInfo', {})).name).toBe('cbt.csi.dev');
      } finally {
        client.close();
      }
    });

    it('refuses plaintext, TLS without a client certificate, and a certificate from another CA', async () => {
      const a = byId('node-a');
      const pem = (f: string) => fs.readFileSync(f);
      const attempts: Array<[string, grpc.ChannelCredentials]> = [
        ['plaintext', grpc.credentials.createInsecure()],
        ['no client certificate', grpc.credentials.createSsl(pem(certs.valid.ca))],
        [
          'a certificate from another CA',
          grpc.credentials.createSsl(pem(certs.valid.ca), pem(certs.foreign.key), pem(certs.foreign.cert)),
        ],
      ];
      for (const [what, credentials] of attempts) {
        const client = peerClient(a.peerPort, credentials);
        try {
          const status = await statusOf(client.call('getPluginInfo', {}, { deadlineMs: 10_000 }));
          expect(status.code, what).toBe(grpc.status.UNAVAILABLE);
        } finally {
          client.close();
        }
      }
    });
  });

  it("kill -9 of a node: its objects answer UNAVAILABLE naming it, the others' still work; after a restart all work", async () => {
    const [a, b, c] = [byId('node-a'), byId('node-b'), byId('node-c')];
    const ofC = data.get('node-c')!;
    const expectedC = await rawStream(c.metadata, { kind: 'allocated', snapshotId: ofC.target });
    // A stream through node-a from node-c, cut by node-c's death after its first message.
    const cut = a.metadata.streamRaw('getMetadataDelta', {
      baseSnapshotId: long.base,
      targetSnapshotId: long.target,
      maxResults: 1,
    });
    const cutError = new Promise<RpcError>((resolve, reject) => {
      cut.once('error', resolve);
      cut.once('end', () => reject(new Error('the stream ended although its owner was killed')));
    });
    await new Promise<void>((resolve) =>
      cut.once('data', () => {
        cut.pause();
        resolve();
      }),
    );
    await c.kill('SIGKILL');
    cut.resume();
    const cutStatus = await cutError;
    expect(cutStatus.code).toBe(grpc.status.UNAVAILABLE);
    expect(readable(cutStatus.details)).toMatch(/node node-c/);
    try {
      for (const asker of [a, b]) {
        const status = await statusOf(rawStream(asker.metadata, { kind: 'allocated', snapshotId: ofC.target }));
        expect(status.code, `${asker.id} → node-c`).toBe(grpc.status.UNAVAILABLE);
        expect(readable(status.details)).toMatch(/node node-c/);
        const snapshot = await statusOf(
          asker.controller.call('createSnapshot', { sourceVolumeId: ofC.volume, name: 'while-down' }),
        );
        expect(snapshot.code).toBe(grpc.status.UNAVAILABLE);
        // The other nodes' objects are not affected.
        for (const owner of ['node-a', 'node-b']) {
          const d = data.get(owner)!;
          expect(extentsOf(await rawStream(asker.metadata, { kind: 'allocated', snapshotId: d.target }))).toEqual(
            expectedExtents(d.changed, d.style),
          );
        }
      }
    } finally {
      await c.start();
    }
    // Back: each node reconnects within its capped back-off (2 s); then everything answers again.
    const deadline = Date.now() + 30_000;
    for (const asker of nodes) {
      let answer = await statusOf(rawStream(asker.metadata, { kind: 'allocated', snapshotId: ofC.target }));
      while (answer.code !== grpc.status.OK && Date.now() < deadline) {
        await new Promise((r) => setTimeout(r, 250));
        answer = await statusOf(rawStream(asker.metadata, { kind: 'allocated', snapshotId: ofC.target }));
      }
      expect(answer.code, `${asker.id} → node-c after the restart`).toBe(grpc.status.OK);
    }
    for (const asker of nodes) {
      expect(await rawStream(asker.metadata, { kind: 'allocated', snapshotId: ofC.target })).toEqual(expectedC);
      for (const d of data.values()) {
        expect(
          extentsOf(
            await rawStream(asker.metadata, { kind: 'delta', baseSnapshotId: d.base, targetSnapshotId: d.target }),
          ),
        ).toEqual(expectedExtents(d.changed, d.style));
      }
    }
  });
});
