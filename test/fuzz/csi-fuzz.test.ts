/**
 * Fuzz test of the running driver: every RPC of Identity, Controller and SnapshotMetadata gets random and
 * malformed requests, generated from the message schemas in src/gen/csi/v1/csi_pb.ts (each field by its
 * kind, with values chosen to hurt: 64 KiB strings, unicode, NUL bytes, path-like and almost-valid IDs,
 * int64 at ±2^63, unknown enum numbers, missing fields, large secret and parameter maps), plus raw garbage
 * bytes and broken gRPC framing.
 *
 * The driver runs as a child process (`cbt-csi serve`), so a crash shows as the child exiting.
 * Rules checked:
 *   - the driver never exits and never hangs;
 *   - every answer is OK or a status the CSI spec uses for a bad request (never INTERNAL, UNKNOWN, ...);
 *   - every OK answer decodes as the method's response message;
 *   - volumes and snapshots that existed before the fuzz are still there, unchanged, afterwards.
 *
 * CBT_FUZZ_RUNS sets the random requests per RPC (default 150; raw garbage gets a third of that).
 * A failure prints fast-check's seed and the request (long strings shortened).
 */
import fs from 'node:fs';
import http2 from 'node:http2';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import type { ChildProcess } from 'node:child_process';
import * as grpc from '@grpc/grpc-js';
import {
  create,
  fromBinary,
  toBinary,
  toJson,
  type DescField,
  type DescMessage,
  type DescMethod,
  ScalarType,
} from '@bufbuild/protobuf';
import { isWrapperDesc } from '@bufbuild/protobuf/wkt';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  Controller,
  Identity,
  SnapshotMetadata,
  VolumeCapability_AccessMode_Mode,
  VolumeContentSourceSchema,
  type ListSnapshotsResponse_Entry,
  type Snapshot,
  type Volume,
} from '../../src/gen/csi/v1/csi_pb.js';
import { TOPOLOGY_NODE_KEY } from '../../src/config.js';
import { ServiceClient, type RpcError } from '../support/csi-client.js';
import { spawnDriver } from '../support/test-driver.js';

const RUNS = Number.parseInt(process.env.CBT_FUZZ_RUNS ?? '', 10) || 150;
const RAW_RUNS = Math.max(10, Math.round(RUNS / 3));
const NODE_ID = 'fuzz-node';
/** A call that takes longer than this is a hang, and a failure. */
const DEADLINE_MS = 20_000;

/** Statuses the CSI spec gives for requests that are wrong, or for features a plugin may lack. */
const ALLOWED: ReadonlySet<number> = new Set([
  grpc.status.OK,
  grpc.status.INVALID_ARGUMENT,
  grpc.status.NOT_FOUND,
  grpc.status.ALREADY_EXISTS,
  grpc.status.OUT_OF_RANGE,
  grpc.status.FAILED_PRECONDITION,
  grpc.status.RESOURCE_EXHAUSTED,
  grpc.status.ABORTED,
  grpc.status.UNIMPLEMENTED,
]);

const SERVICES = [Identity, Controller, SnapshotMetadata] as const;
const I64_MIN = -(2n ** 63n);
const I64_MAX = 2n ** 63n - 1n;
const GiB = 1n << 30n;
const MiB = 1n << 20n;

/** A request being built: field values keyed by the generated code's local names (an init shape). */
type Init = { [key: string]: unknown };

// ------------------------------------------------------------------------------------------------------------
// The driver under test and what it held before the fuzz.

interface Fixture {
  dir: string;
  child: ChildProcess;
  stderr: () => string;
  stdout: () => string;
  target: string;
  identity: ServiceClient<typeof Identity>;
  controller: ServiceClient<typeof Controller>;
  metadata: ServiceClient<typeof SnapshotMetadata>;
  /** For raw bytes on server-streaming methods, which ServiceClient only calls with typed messages. */
  raw: grpc.Client;
}

/** IDs and names the generators draw from; `created*` grows as fuzzed creates succeed. */
interface Pools {
  preservedVolumes: Volume[];
  preservedSnapshots: Snapshot[];
  sacrificialVolumes: string[];
  sacrificialSnapshots: string[];
  createdVolumes: string[];
  createdSnapshots: string[];
  names: string[];
  capacities: bigint[];
  /** next_token values List* calls returned. */
  tokens: string[];
}

let fx: Fixture;
const pools: Pools = {
  preservedVolumes: [],
  preservedSnapshots: [],
  sacrificialVolumes: [],
  sacrificialSnapshots: [],
  createdVolumes: [],
  createdSnapshots: [],
  names: [],
  capacities: [],
  tokens: [],
};
/** What SnapshotMetadata said about each preserved snapshot before the fuzz. */
const allocatedBefore = new Map<string, string>();
/** Status counts per RPC, printed at the end so a run shows how deep the requests got. */
const histogram = new Map<string, Map<string, number>>();

function childAlive(): boolean {
  return fx.child.exitCode === null && fx.child.signalCode === null;
}

function count(rpc: string, code: number): void {
  const row = histogram.get(rpc) ?? new Map<string, number>();
  const name = grpc.status[code] ?? String(code);
  row.set(name, (row.get(name) ?? 0) + 1);
  histogram.set(rpc, row);
}

const blockCapability = (mode = VolumeCapability_AccessMode_Mode.SINGLE_NODE_WRITER) => ({
  accessType: { case: 'block' as const, value: {} },
  accessMode: { mode },
});
const _mountCapability = (fsType: string) => ({
  accessType: { case: 'mount' as const, value: { fsType, mountFlags: [] } },
  accessMode: { mode: VolumeCapability_AccessMode_Mode.SINGLE_NODE_WRITER },
});

async function setUpObjects(): Promise<void> {
  const c = fx.controller;
  const volume = async (name: string, requiredBytes: bigint, parameters: Record<string, string>, extra: Init = {}) => {
    const res = await c.call('createVolume', {
      name,
      capacityRange: { requiredBytes },
      volumeCapabilities: [blockCapability()],
      parameters,
      ...extra,
    });
    pools.names.push(name);
    return res.volume!;
  };
  const snapshot = async (sourceVolumeId: string, name: string) => {
    const res = await c.call('createSnapshot', { sourceVolumeId, name });
    pools.names.push(name);
    return res.snapshot!;
  };

  // Preserved: nothing may change them. Two styles, two block sizes, one clone so a chain spans volumes.
  const v1 = await volume('preserved-variable', GiB, { metadataStyle: 'VARIABLE' });
  const v2 = await volume('preserved-fixed', 64n * MiB, { metadataStyle: 'FIXED', blockSize: '64Ki' });
  const s1a = await snapshot(v1.volumeId, 'preserved-variable-a');
  const s1b = await snapshot(v1.volumeId, 'preserved-variable-b');
  const s2a = await snapshot(v2.volumeId, 'preserved-fixed-a');
  const v3 = await volume(
    'preserved-clone',
    2n * GiB,
    {},
    {
      volumeContentSource: { type: { case: 'snapshot', value: { snapshotId: s1a.snapshotId } } },
    },
  );
  pools.preservedVolumes.push(v1, v2, v3);
  pools.preservedSnapshots.push(s1a, s1b, s2a);

  // Sacrificial: fuzzed deletes and expansions may hit these.
  const x1 = await volume('sacrificial', 16n * MiB, { metadataStyle: 'FIXED' });
  const xs1 = await snapshot(x1.volumeId, 'sacrificial-a');
  const xs2 = await snapshot(x1.volumeId, 'sacrificial-b');
  const x2 = await volume(
    'sacrificial-clone',
    16n * MiB,
    {},
    {
      volumeContentSource: { type: { case: 'volume', value: { volumeId: x1.volumeId } } },
    },
  );
  pools.sacrificialVolumes.push(x1.volumeId, x2.volumeId);
  pools.sacrificialSnapshots.push(xs1.snapshotId, xs2.snapshotId);

  pools.capacities = [...new Set([v1, v2, v3, x1, x2].map((v) => v.capacityBytes))];
  for (const s of pools.preservedSnapshots) allocatedBefore.set(s.snapshotId, await allocatedOf(s.snapshotId));
}

/** GetMetadataAllocated of a snapshot as a comparable string (style, capacity, every tuple). */
async function allocatedOf(snapshotId: string): Promise<string> {
  const messages = await fx.metadata.collect('getMetadataAllocated', { snapshotId });
  return JSON.stringify(
    messages.map((m) => ({
      type: m.blockMetadataType,
      capacity: String(m.volumeCapacityBytes),
      tuples: m.blockMetadata.map((b) => `${b.byteOffset}+${b.sizeBytes}`),
    })),
  );
}

// ------------------------------------------------------------------------------------------------------------
// Value generators. Request generators are built from the schemas after setUpObjects(), so that they can
// draw the real IDs, names and capacities.

/** Placeholder for "an object a fuzzed create made", resolved just before sending (the pool grows meanwhile). */
const REF = '\u0001ref:';

const nastyConstants = [
  '',
  ' ',
  '\u0000',
  'a\u0000b',
  '../../etc',
  '../../../../../../etc/passwd',
  '/etc/passwd',
  '.',
  '..',
  '/',
  '%2e%2e%2f%2e%2e%2fetc',
  '..\\..\\windows',
  '\u202eevil',
  '\ufeff',
  '\ud800',
  '😀'.repeat(3),
  "'; DROP TABLE volumes; --",
  '" OR 1=1 --',
  '__proto__',
  'constructor',
  'toString',
  'null',
  'undefined',
  'NaN',
  '-1',
  '1e309',
  '0x10',
  // biome-ignore lint/suspicious/noTemplateCurlyInString: a shell-looking string is the hostile input
  '${HOME}',
  '$(reboot)',
  'vol-',
  'snap-',
  'vol-0000000000000000',
  'snap-ffffffffffffffff',
  'vol-../../etc',
  'snap-\u0000',
];

function hugeString(): fc.Arbitrary<string> {
  return fc
    .tuple(
      fc.integer({ min: 1024, max: 64 * 1024 }),
      fc.constantFrom('x', 'é', '😀', '\u0000', '../', 'vol-', '\u202e'),
    )
    .map(([n, unit]) => unit.repeat(Math.ceil(n / unit.length)).slice(0, n));
}

function junkString(allowHuge: boolean): fc.Arbitrary<string> {
  const parts: fc.WeightedArbitrary<string>[] = [
    { weight: 3, arbitrary: fc.string({ maxLength: 40 }) },
    { weight: 2, arbitrary: fc.string({ unit: 'grapheme', maxLength: 24 }) },
    { weight: 2, arbitrary: fc.string({ unit: 'binary', maxLength: 24 }) },
    { weight: 3, arbitrary: fc.constantFrom(...nastyConstants) },
  ];
  if (allowHuge) parts.push({ weight: 1, arbitrary: hugeString() });
  return fc.oneof(...parts);
}

/** An existing ID spelled slightly wrong: none of these may reach the object it resembles. */
function nearMiss(id: string): fc.Arbitrary<string> {
  return fc.constantFrom(
    `${id}\u0000`,
    `${id} `,
    ` ${id}`,
    id.toUpperCase(),
    id.slice(0, -1),
    `${id}0`,
    `${id}/../${id}`,
    `../${id}`,
    `${id}\n`,
    encodeURIComponent(`${id}/`),
  );
}

function idArb(kind: 'volume' | 'snapshot'): fc.Arbitrary<string> {
  const known =
    kind === 'volume'
      ? [...pools.preservedVolumes.map((v) => v.volumeId), ...pools.sacrificialVolumes]
      : [...pools.preservedSnapshots.map((s) => s.snapshotId), ...pools.sacrificialSnapshots];
  const other =
    kind === 'volume'
      ? pools.preservedSnapshots.map((s) => s.snapshotId)
      : pools.preservedVolumes.map((v) => v.volumeId);
  const prefix = kind === 'volume' ? 'vol-' : 'snap-';
  return fc.oneof(
    { weight: 6, arbitrary: fc.constantFrom(...known) },
    { weight: 3, arbitrary: fc.nat(1000).map((n) => `${REF}${kind}:${n}`) },
    { weight: 1, arbitrary: fc.constantFrom(...other) },
    { weight: 2, arbitrary: fc.constantFrom(...known).chain(nearMiss) },
    {
      weight: 2,
      arbitrary: fc
        .tuple(
          fc.constantFrom('vol-', 'snap-', prefix),
          fc.oneof(fc.stringMatching(/^[0-9a-f]{16}$/), junkString(false)),
        )
        .map(([p, s]) => p + s),
    },
    { weight: 2, arbitrary: junkString(true) },
  );
}

function nameArb(): fc.Arbitrary<string> {
  return fc.oneof(
    { weight: 4, arbitrary: fc.nat().map((n) => `fuzz-${n}`) },
    { weight: 2, arbitrary: fc.constantFrom(...pools.names) },
    // Few enough that concurrent requests collide on them.
    { weight: 2, arbitrary: fc.nat(15).map((n) => `race-${n}`) },
    { weight: 1, arbitrary: fc.uuid().map((u) => `pvc-${u}`) },
    { weight: 2, arbitrary: junkString(true) },
  );
}

function int64Arb(): fc.Arbitrary<bigint> {
  const capacities = pools.capacities.length > 0 ? pools.capacities : [GiB];
  return fc.oneof(
    {
      weight: 3,
      arbitrary: fc.constantFrom(
        0n,
        1n,
        -1n,
        I64_MAX,
        I64_MIN,
        I64_MAX - 1n,
        I64_MIN + 1n,
        2n ** 53n,
        2n ** 53n + 1n,
        -(2n ** 53n),
        2n ** 32n,
        2n ** 31n,
        4095n,
        4096n,
        4097n,
        GiB,
        1n << 40n,
        // 2^32 blocks of 4 KiB: the engine's limit, and one block past it.
        1n << 44n,
        (1n << 44n) + 4096n,
        1n << 62n,
      ),
    },
    { weight: 2, arbitrary: fc.bigInt({ min: I64_MIN, max: I64_MAX }) },
    { weight: 3, arbitrary: fc.integer({ min: -4, max: 1 << 16 }).map((n) => BigInt(n) * 4096n) },
    {
      weight: 3,
      arbitrary: fc
        .tuple(fc.constantFrom(...capacities), fc.integer({ min: -70_000, max: 70_000 }))
        .map(([c, d]) => c + BigInt(d)),
    },
  );
}

function int32Arb(): fc.Arbitrary<number> {
  return fc.oneof(
    fc.constantFrom(0, 1, -1, 2, 2 ** 31 - 1, -(2 ** 31), 255, 256, 4096, 16384, 16385, 65536, 1_000_000),
    fc.integer(),
    fc.integer({ min: -3, max: 50 }),
  );
}

function mapArb(value: fc.Arbitrary<string>, key: fc.Arbitrary<string>): fc.Arbitrary<Record<string, string>> {
  const small = fc.dictionary(key, value, { maxKeys: 6, noNullPrototype: true });
  // Many entries, short strings: a large map without a 4 MiB message.
  const wide = fc.dictionary(fc.string({ minLength: 1, maxLength: 60 }), fc.string({ maxLength: 60 }), {
    minKeys: 50,
    maxKeys: 400,
    noNullPrototype: true,
  });
  return fc.oneof({ weight: 6, arbitrary: small }, { weight: 1, arbitrary: wide });
}

function parametersArb(): fc.Arbitrary<Record<string, string>> {
  const key = fc.oneof(
    {
      weight: 4,
      arbitrary: fc.constantFrom(
        'blockSize',
        'metadataStyle',
        'csi.storage.k8s.io/pvc/name',
        'csi.storage.k8s.io/pv/name',
      ),
    },
    { weight: 1, arbitrary: fc.constantFrom('BlockSize', 'blocksize', 'metadata_style', 'csi.storage.k8s.io/') },
    { weight: 2, arbitrary: junkString(false) },
  );
  const value = fc.oneof(
    {
      weight: 4,
      arbitrary: fc.constantFrom(
        '4096',
        '4Ki',
        '64Ki',
        '1Mi',
        '1MiB',
        '2Mi',
        '512',
        '4097',
        '0',
        '-4096',
        '4096.0',
        ' 4096 ',
        '1e3',
        '99999999999999999999999',
        'FIXED',
        'VARIABLE',
        'fixed_length',
        'VARIABLE_LENGTH',
        'UNKNOWN',
        '',
      ),
    },
    { weight: 2, arbitrary: junkString(true) },
  );
  return mapArb(value, key);
}

function secretsArb(): fc.Arbitrary<Record<string, string>> {
  return mapArb(
    junkString(true),
    fc.oneof(fc.constantFrom('password', 'token', 'csi.storage.k8s.io/secret'), junkString(false)),
  );
}

function segmentsArb(): fc.Arbitrary<Record<string, string>> {
  return mapArb(
    fc.oneof(fc.constantFrom(NODE_ID, 'other-node', ''), junkString(false)),
    fc.oneof(fc.constantFrom(TOPOLOGY_NODE_KEY, 'topology.kubernetes.io/zone'), junkString(false)),
  );
}

const ID_FIELDS: Record<string, 'volume' | 'snapshot'> = {
  volume_id: 'volume',
  source_volume_id: 'volume',
  snapshot_id: 'snapshot',
  base_snapshot_id: 'snapshot',
  target_snapshot_id: 'snapshot',
};

const MAX_DEPTH = 5;

/** A scalar value; `name` (the proto field name) picks values that mean something to the driver. */
function scalarArb(scalar: ScalarType, name: string): fc.Arbitrary<unknown> {
  const kind = ID_FIELDS[name];
  switch (scalar) {
    case ScalarType.STRING:
      if (kind) return idArb(kind);
      if (name === 'name') return nameArb();
      if (name === 'node_id') return fc.oneof(fc.constantFrom(NODE_ID, 'other-node'), junkString(true));
      if (name === 'fs_type') return fc.oneof(fc.constantFrom('ext4', 'xfs', 'btrfs', 'EXT4', ''), junkString(false));
      if (name === 'starting_token') {
        return fc.oneof(
          fc.constantFrom('0', '1', '2', '-1', '99999999999999999999', '1.5', '0x1', ' 1', 'NaN', 'Infinity'),
          fc.nat(50).map(String),
          fc.nat(1000).map((n) => `${REF}token:${n}`),
          idArb('volume'),
          junkString(true),
        );
      }
      return junkString(true);
    case ScalarType.INT64:
    case ScalarType.SINT64:
    case ScalarType.SFIXED64:
      return int64Arb();
    case ScalarType.UINT64:
    case ScalarType.FIXED64:
      return fc.bigInt({ min: 0n, max: 2n ** 64n - 1n });
    case ScalarType.INT32:
    case ScalarType.SINT32:
    case ScalarType.SFIXED32:
      return int32Arb();
    case ScalarType.UINT32:
    case ScalarType.FIXED32:
      return fc.nat({ max: 2 ** 32 - 1 });
    case ScalarType.BOOL:
      return fc.boolean();
    case ScalarType.BYTES:
      return fc.uint8Array({ maxLength: 64 });
    case ScalarType.DOUBLE:
    case ScalarType.FLOAT:
      return fc.double();
  }
}

function enumArb(values: readonly { number: number }[]): fc.Arbitrary<number> {
  return fc.oneof(
    { weight: 4, arbitrary: fc.constantFrom(...values.map((v) => v.number)) },
    { weight: 1, arbitrary: fc.oneof(fc.integer({ min: -3, max: 40 }), fc.integer()) },
  );
}

/** One value for a singular (non-list, non-map) field. */
function singularArb(field: DescField, depth: number): fc.Arbitrary<unknown> {
  switch (field.fieldKind) {
    case 'scalar':
      return scalarArb(field.scalar, field.name);
    case 'enum':
      return enumArb(field.enum.values);
    case 'message': {
      if (isWrapperDesc(field.message)) {
        const inner = field.message.fields[0]!;
        return singularArb(inner, depth + 1);
      }
      return depth >= MAX_DEPTH ? fc.constant({}) : messageArb(field.message, depth + 1);
    }
    case 'list':
    case 'map':
      throw new Error(`singularArb on ${field.fieldKind} field ${field.name}`);
  }
}

function fieldArb(field: DescField, depth: number): fc.Arbitrary<unknown> {
  switch (field.fieldKind) {
    case 'list': {
      let element: fc.Arbitrary<unknown>;
      if (field.listKind === 'scalar') element = scalarArb(field.scalar, field.name);
      else if (field.listKind === 'enum') element = enumArb(field.enum.values);
      else element = depth >= MAX_DEPTH ? fc.constant({}) : messageArb(field.message, depth + 1);
      return fc.oneof(
        { weight: 4, arbitrary: fc.array(element, { maxLength: 3 }) },
        { weight: 1, arbitrary: fc.array(element, { maxLength: 40 }) },
      );
    }
    case 'map':
      if (field.name === 'parameters' || field.name === 'mutable_parameters') return parametersArb();
      if (field.name === 'secrets') return secretsArb();
      if (field.name === 'segments') return segmentsArb();
      return mapArb(junkString(true), junkString(false));
    default:
      return singularArb(field, depth);
  }
}

/** Any message of `desc`: each field present or missing, each oneof on any of its cases or none. */
function messageArb(desc: DescMessage, depth = 0): fc.Arbitrary<Init> {
  const parts: Record<string, fc.Arbitrary<unknown>> = {};
  for (const member of desc.members) {
    if (member.kind === 'oneof') {
      parts[member.localName] = fc.oneof(
        ...member.fields.map((f) => singularArb(f, depth).map((value) => ({ case: f.localName, value }))),
      );
    } else {
      parts[member.localName] = fieldArb(member, depth);
    }
  }
  return fc.record(parts, { requiredKeys: [] }) as fc.Arbitrary<Init>;
}

// ------------------------------------------------------------------------------------------------------------
// Near-valid requests: a valid request with some fields dropped or swapped for schema-random values, so
// that the fuzz also reaches the code behind each RPC's argument checks, not only the checks.

function capabilityArb(): fc.Arbitrary<Init> {
  return fc.record({
    accessType: fc.oneof(
      fc.constant({ case: 'block', value: {} }),
      fc
        .record({ fsType: fc.constantFrom('', 'ext4', 'xfs'), mountFlags: fc.constantFrom([], ['noatime']) })
        .map((value) => ({ case: 'mount', value })),
    ),
    // Mostly the SINGLE_NODE_* modes a one-node driver serves; sometimes the multi-node ones it refuses.
    accessMode: fc.record({
      mode: fc.oneof(
        { weight: 4, arbitrary: fc.constantFrom(1, 2, 6, 7) },
        { weight: 1, arbitrary: fc.constantFrom(3, 4, 5) },
      ),
    }),
  });
}

function validParametersArb(): fc.Arbitrary<Record<string, string>> {
  return fc.record(
    { blockSize: fc.constantFrom('4096', '4Ki', '64Ki', '1Mi'), metadataStyle: fc.constantFrom('FIXED', 'VARIABLE') },
    { requiredKeys: [] },
  );
}

function smallOffsetArb(): fc.Arbitrary<bigint> {
  return fc.oneof(
    fc.integer({ min: 0, max: 1 << 14 }).map((n) => BigInt(n) * 4096n),
    fc.nat({ max: 1 << 26 }).map(BigInt),
    fc.constantFrom(...pools.capacities),
  );
}

function snapshotRefArb(): fc.Arbitrary<string> {
  return fc.oneof(
    fc.constantFrom(...pools.preservedSnapshots.map((s) => s.snapshotId), ...pools.sacrificialSnapshots),
    fc.nat(1000).map((n) => `${REF}snapshot:${n}`),
  );
}

function volumeRefArb(): fc.Arbitrary<string> {
  return fc.oneof(
    fc.constantFrom(...pools.preservedVolumes.map((v) => v.volumeId), ...pools.sacrificialVolumes),
    fc.nat(1000).map((n) => `${REF}volume:${n}`),
  );
}

/** A request the driver should accept (or refuse only for the state it is in), per RPC. */
function templateArb(method: DescMethod): fc.Arbitrary<Init> | undefined {
  const listPaging = {
    maxEntries: fc.integer({ min: 0, max: 5 }),
    startingToken: fc.oneof(
      fc.constant(''),
      fc.nat(1000).map((n) => `${REF}token:${n}`),
    ),
  };
  switch (method.name) {
    case 'CreateVolume':
      return fc.record(
        {
          name: fc.oneof(
            { weight: 4, arbitrary: fc.nat().map((n) => `fuzz-${n}`) },
            { weight: 1, arbitrary: fc.constantFrom(...pools.names) },
            { weight: 2, arbitrary: fc.nat(15).map((n) => `race-${n}`) },
          ),
          capacityRange: fc.record(
            {
              requiredBytes: fc.oneof(
                fc.integer({ min: 0, max: 1 << 16 }).map((n) => BigInt(n) * 4096n),
                fc.constantFrom(...pools.capacities),
              ),
              limitBytes: fc.oneof(
                { weight: 4, arbitrary: fc.constant(0n) },
                { weight: 1, arbitrary: fc.integer({ min: 1, max: 1 << 18 }).map((n) => BigInt(n) * 4096n) },
              ),
            },
            { requiredKeys: ['requiredBytes'] },
          ),
          volumeCapabilities: fc.array(capabilityArb(), { minLength: 1, maxLength: 2 }),
          parameters: validParametersArb(),
          volumeContentSource: fc.oneof(
            snapshotRefArb().map((snapshotId) => ({ type: { case: 'snapshot', value: { snapshotId } } })),
            volumeRefArb().map((volumeId) => ({ type: { case: 'volume', value: { volumeId } } })),
          ),
          accessibilityRequirements: fc.constant({
            requisite: [{ segments: { [TOPOLOGY_NODE_KEY]: NODE_ID } }],
            preferred: [{ segments: { [TOPOLOGY_NODE_KEY]: NODE_ID } }],
          }),
        },
        { requiredKeys: ['name', 'volumeCapabilities'] },
      );
    case 'CreateSnapshot':
      return fc.record({
        sourceVolumeId: volumeRefArb(),
        name: fc.oneof(
          fc.nat().map((n) => `fuzz-snap-${n}`),
          fc.constantFrom(...pools.names),
          fc.nat(15).map((n) => `race-${n}`),
        ),
      });
    case 'ControllerExpandVolume':
      return fc.record(
        {
          volumeId: volumeRefArb(),
          capacityRange: fc
            .tuple(fc.constantFrom(...pools.capacities), fc.integer({ min: -1, max: 64 }), fc.boolean())
            .map(([c, k, limited]) => {
              const requiredBytes = c + BigInt(k) * 4096n;
              return { requiredBytes, limitBytes: limited ? 2n * requiredBytes : 0n };
            }),
          volumeCapability: capabilityArb(),
        },
        { requiredKeys: ['volumeId', 'capacityRange'] },
      );
    case 'ValidateVolumeCapabilities':
      return fc.record(
        {
          volumeId: volumeRefArb(),
          volumeCapabilities: fc.array(capabilityArb(), { minLength: 1, maxLength: 2 }),
          parameters: validParametersArb(),
        },
        { requiredKeys: ['volumeId', 'volumeCapabilities'] },
      );
    case 'GetCapacity':
      return fc.record({
        volumeCapabilities: fc.array(capabilityArb(), { maxLength: 2 }),
        parameters: validParametersArb(),
        accessibleTopology: fc.constantFrom(
          { segments: { [TOPOLOGY_NODE_KEY]: NODE_ID } },
          { segments: { [TOPOLOGY_NODE_KEY]: 'elsewhere' } },
        ),
      });
    case 'ListVolumes':
      return fc.record(listPaging);
    case 'ListSnapshots':
      return fc.record(
        { ...listPaging, sourceVolumeId: volumeRefArb(), snapshotId: snapshotRefArb() },
        { requiredKeys: [] },
      );
    case 'GetMetadataAllocated':
      return fc.record({
        snapshotId: snapshotRefArb(),
        startingOffset: smallOffsetArb(),
        maxResults: fc.integer({ min: 0, max: 8 }),
      });
    case 'GetMetadataDelta': {
      // Pairs from one chain (which the driver must answer) as often as arbitrary pairs.
      const [s1a, s1b] = pools.preservedSnapshots;
      const [xs1, xs2] = pools.sacrificialSnapshots;
      const pair = fc.oneof(
        fc.constantFrom([s1a!.snapshotId, s1b!.snapshotId], [s1b!.snapshotId, s1b!.snapshotId], [xs1!, xs2!]),
        fc.tuple(snapshotRefArb(), snapshotRefArb()),
      );
      return fc
        .record({ pair, startingOffset: smallOffsetArb(), maxResults: fc.integer({ min: 0, max: 8 }) })
        .map(({ pair: [baseSnapshotId, targetSnapshotId], ...rest }) => ({
          baseSnapshotId,
          targetSnapshotId,
          ...rest,
        }));
    }
    default:
      return undefined;
  }
}

/** For each top-level field: keep the template's value (mostly), drop it, or take the random request's. */
function requestArb(method: DescMethod): fc.Arbitrary<Init> {
  const random = messageArb(method.input);
  const template = templateArb(method);
  if (!template) return random;
  const keys = method.input.members.map((m) => m.localName);
  const nearValid = fc
    .tuple(template, random, fc.array(fc.nat(11), { minLength: keys.length, maxLength: keys.length }))
    .map(([valid, other, picks]) => {
      const out: Init = { ...valid };
      keys.forEach((key, i) => {
        const pick = picks[i]!;
        if (pick === 0) delete out[key];
        else if (pick === 1 && other[key] !== undefined) out[key] = other[key];
      });
      return out;
    });
  return fc.oneof({ weight: 1, arbitrary: random }, { weight: 2, arbitrary: nearValid });
}

/** Replaces REF placeholders with IDs that fuzzed creates returned (or an unknown one while there are none). */
function resolveRefs(value: unknown): unknown {
  if (typeof value === 'string' && value.startsWith(REF)) {
    const [kind, index] = value.slice(REF.length).split(':');
    const pool = kind === 'volume' ? pools.createdVolumes : kind === 'snapshot' ? pools.createdSnapshots : pools.tokens;
    if (pool.length > 0) return pool[Number(index) % pool.length]!;
    return kind === 'volume' ? 'vol-0123456789abcdef' : kind === 'snapshot' ? 'snap-0123456789abcdef' : '1';
  }
  if (Array.isArray(value)) return value.map(resolveRefs);
  if (value !== null && typeof value === 'object' && !(value instanceof Uint8Array)) {
    const out: Init = {};
    for (const [k, v] of Object.entries(value)) out[k] = resolveRefs(v);
    return out;
  }
  return value;
}

/**
 * Requests that would delete or resize a preserved object are redirected to a sacrificial one: the check
 * that preserved objects survive must only fail for a driver that changes what it was not asked to change.
 */
function sparePreserved(method: DescMethod, init: Init): Init {
  const volumes = new Set(pools.preservedVolumes.map((v) => v.volumeId));
  const snapshots = new Set(pools.preservedSnapshots.map((s) => s.snapshotId));
  if (
    (method.name === 'DeleteVolume' || method.name === 'ControllerExpandVolume') &&
    volumes.has(init.volumeId as string)
  ) {
    return { ...init, volumeId: pools.sacrificialVolumes[0] };
  }
  if (method.name === 'DeleteSnapshot' && snapshots.has(init.snapshotId as string)) {
    return { ...init, snapshotId: pools.sacrificialSnapshots[0] };
  }
  return init;
}

// ------------------------------------------------------------------------------------------------------------
// Sending.

interface Outcome {
  code: number;
  details: string;
  /** Response messages of an OK call, raw. */
  messages: Buffer[];
}

function rawStream(method: DescMethod, bytes: Uint8Array): Promise<Outcome> {
  return new Promise((resolve) => {
    const messages: Buffer[] = [];
    const call = fx.raw.makeServerStreamRequest(
      `/${method.parent.typeName}/${method.name}`,
      (b: Uint8Array) => Buffer.from(b),
      (b: Buffer) => b,
      bytes,
      new grpc.Metadata(),
      { deadline: Date.now() + DEADLINE_MS },
    );
    call.on('data', (m: Buffer) => messages.push(m));
    call.on('error', (err: RpcError) => resolve({ code: err.code, details: err.details, messages }));
    call.on('status', (s: grpc.StatusObject) => {
      if (s.code === grpc.status.OK) resolve({ code: 0, details: '', messages });
    });
  });
}

function clientFor(method: DescMethod): ServiceClient<(typeof SERVICES)[number]> {
  if (method.parent.typeName === Identity.typeName) return fx.identity as ServiceClient<(typeof SERVICES)[number]>;
  if (method.parent.typeName === Controller.typeName) return fx.controller as ServiceClient<(typeof SERVICES)[number]>;
  return fx.metadata as ServiceClient<(typeof SERVICES)[number]>;
}

async function send(method: DescMethod, bytes: Uint8Array): Promise<Outcome> {
  if (method.methodKind === 'server_streaming') return rawStream(method, bytes);
  try {
    const reply = await clientFor(method).callRaw(method.localName, bytes, DEADLINE_MS);
    return { code: 0, details: '', messages: [reply] };
  } catch (err) {
    const e = err as RpcError;
    return { code: e.code, details: e.details, messages: [] };
  }
}

/** Shortens long strings so that a failing request can be printed. */
function printable(method: DescMethod, init: Init): string {
  try {
    const json = toJson(method.input, create(method.input, init as never), { alwaysEmitImplicit: false });
    return JSON.stringify(json, (_k, v: unknown) =>
      typeof v === 'string' && v.length > 120 ? `${v.slice(0, 60)}…(${v.length} chars)…${v.slice(-20)}` : v,
    );
  } catch (err) {
    return `(unprintable: ${String(err)})`;
  }
}

function driverLog(): string {
  return `driver stderr:\n${fx.stderr().slice(-4000)}\ndriver stdout (errors):\n${fx.stdout().slice(-4000)}`;
}

/**
 * Checks one outcome against the rules; returns a description of what is wrong, or undefined.
 * An OK answer must decode as the method's output, and creates feed the pools.
 */
function judge(method: DescMethod, outcome: Outcome): string | undefined {
  if (!childAlive()) return `the driver exited (code ${fx.child.exitCode}, signal ${fx.child.signalCode})`;
  if (!ALLOWED.has(outcome.code)) {
    return `status ${grpc.status[outcome.code] ?? outcome.code} (${outcome.code}) "${outcome.details}"`;
  }
  if (outcome.code !== 0) return undefined;
  for (const bytes of outcome.messages) {
    let reply: Init;
    try {
      reply = fromBinary(method.output, bytes) as unknown as Init;
    } catch (err) {
      return `the OK reply does not decode as ${method.output.typeName}: ${String(err)}`;
    }
    if (method.name === 'CreateVolume') {
      const v = reply.volume as Volume | undefined;
      if (v?.volumeId) pools.createdVolumes.push(v.volumeId);
    }
    if (method.name === 'CreateSnapshot') {
      const s = reply.snapshot as Snapshot | undefined;
      if (s?.snapshotId) pools.createdSnapshots.push(s.snapshotId);
    }
    const token = reply.nextToken;
    if (typeof token === 'string' && token !== '' && !pools.tokens.includes(token)) pools.tokens.push(token);
  }
  return undefined;
}

/**
 * Runs a property; once the driver is dead, every further run (fast-check's shrinking) passes, so the
 * counterexample reported is the request that was sent when it died, not a shrunk unrelated one.
 */
async function fuzz<T>(
  arb: fc.Arbitrary<T>,
  numRuns: number,
  run: (value: T) => Promise<string | undefined>,
): Promise<void> {
  let firstDeath: string | undefined;
  await fc.assert(
    fc.asyncProperty(arb, async (value) => {
      if (firstDeath !== undefined) return;
      const problem = await run(value);
      if (problem === undefined) return;
      if (!childAlive()) firstDeath = problem;
      throw new Error(`${problem}\n${driverLog()}`);
    }),
    { numRuns, interruptAfterTimeLimit: 10 * 60_000 },
  );
}

// ------------------------------------------------------------------------------------------------------------
// Raw bytes: garbage, mutated valid encodings, and hand-made protobuf that parsers trip on.

type Mutation =
  | { kind: 'truncate'; at: number }
  | { kind: 'flip'; at: number; mask: number }
  | { kind: 'insert'; at: number; bytes: Uint8Array };

const varint = (n: bigint): number[] => {
  const out: number[] = [];
  let v = BigInt.asUintN(64, n);
  do {
    let b = Number(v & 0x7fn);
    v >>= 7n;
    if (v > 0n) b |= 0x80;
    out.push(b);
  } while (v > 0n);
  return out;
};

const handmade: Uint8Array[] = [
  new Uint8Array([0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x41]), // field 1 length 2^32-1, one byte present
  new Uint8Array([0x08, ...Array<number>(10).fill(0xff), 0x01]), // varint longer than 10 bytes
  new Uint8Array([0x00, 0x01]), // field number 0
  new Uint8Array([0x0e, 0x01]), // wire type 6
  new Uint8Array([0x0f, 0x01]), // wire type 7
  new Uint8Array([0x0b]), // start group, never ended
  new Uint8Array([0x0c]), // end group without a start
  new Uint8Array([...Array<number>(50_000).fill(0x0b), ...Array<number>(50_000).fill(0x0c)]), // groups nested 50k deep
  new Uint8Array([0x0a, 0x03, 0xff, 0xfe, 0xc0]), // field 1 string that is not UTF-8
  new Uint8Array([0x12, 0x04, 0xed, 0xa0, 0x80, 0x41]), // field 2: an encoded lone surrogate
  new Uint8Array([0x0a, 0x02, 0x00, 0x00]), // field 1: NUL bytes
  new Uint8Array([...varint((2n ** 29n - 1n) << 3n), 0x01]), // largest field number
  new Uint8Array([0x18, ...varint(-1n)]), // field 3 varint -1 (10 bytes)
  new Uint8Array([0x10, ...varint(I64_MIN)]), // field 2 varint INT64_MIN
  new Uint8Array([0x1a, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01]), // length 2^63
  new Uint8Array([0x22, 0x05, 0x0a, 0x03, 0x61]), // map entry whose key string runs past the entry
  new Uint8Array([0x2a, 0x02, 0x08, 0x01]), // field 5 as a message holding a varint
  new Uint8Array(0),
];

interface RawPayload {
  bytes?: Uint8Array;
  init?: Init;
  desc?: DescMessage;
  mutations: readonly Mutation[];
}

function rawArb(method: DescMethod): fc.Arbitrary<RawPayload> {
  const allMethods = SERVICES.flatMap((s) => s.methods);
  const mutation: fc.Arbitrary<Mutation> = fc.oneof(
    fc.double({ min: 0, max: 1, noNaN: true }).map((at): Mutation => ({ kind: 'truncate', at })),
    fc
      .tuple(fc.double({ min: 0, max: 1, noNaN: true }), fc.integer({ min: 1, max: 255 }))
      .map(([at, mask]): Mutation => ({ kind: 'flip', at, mask })),
    fc
      .tuple(fc.double({ min: 0, max: 1, noNaN: true }), fc.uint8Array({ minLength: 1, maxLength: 12 }))
      .map(([at, bytes]): Mutation => ({ kind: 'insert', at, bytes })),
  );
  const encodedOf = (desc: DescMessage) =>
    fc.record({
      init: messageArb(desc),
      desc: fc.constant(desc),
      mutations: fc.array(mutation, { minLength: 0, maxLength: 3 }),
    });
  return fc.oneof(
    {
      weight: 3,
      arbitrary: fc.record({ bytes: fc.uint8Array({ maxLength: 2048 }), mutations: fc.constant<Mutation[]>([]) }),
    },
    {
      weight: 2,
      arbitrary: fc.record({ bytes: fc.constantFrom(...handmade), mutations: fc.constant<Mutation[]>([]) }),
    },
    { weight: 4, arbitrary: encodedOf(method.input) },
    // A valid request of another method: a different schema on the same bytes.
    { weight: 2, arbitrary: fc.constantFrom(...allMethods).chain((m) => encodedOf(m.input)) },
  );
}

function applyMutations(bytes: Uint8Array, mutations: readonly Mutation[]): Uint8Array {
  let out = bytes;
  for (const m of mutations) {
    const at = Math.floor(m.at * out.length);
    if (m.kind === 'truncate') out = out.subarray(0, at);
    else if (m.kind === 'flip') {
      if (out.length === 0) continue;
      out = Uint8Array.from(out);
      out[Math.min(at, out.length - 1)]! ^= m.mask;
    } else out = new Uint8Array([...out.subarray(0, at), ...m.bytes, ...out.subarray(at)]);
  }
  return out;
}

// ------------------------------------------------------------------------------------------------------------
// gRPC framing the grpc-js client never sends: raw HTTP/2 requests on the socket.

interface H2Outcome {
  httpStatus: number;
  grpcStatus: number | undefined;
  message: string;
}

/**
 * One raw HTTP/2 request. It resolves at the trailers: a server that answers before reading the whole body
 * (an oversized message) may leave the request half open, and waiting for the stream to close would hang.
 */
function h2Request(
  socket: string,
  pathName: string,
  headers: http2.OutgoingHttpHeaders,
  body: Uint8Array,
): Promise<H2Outcome> {
  return new Promise((resolve) => {
    const session = http2.connect('http://localhost', { createConnection: () => net.connect(socket) });
    let httpStatus = 0;
    let grpcStatus: number | undefined;
    let message = '';
    let done = false;
    const finish = (why?: string) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      if (why !== undefined && grpcStatus === undefined) message = why;
      session.destroy();
      resolve({ httpStatus, grpcStatus, message });
    };
    const timer = setTimeout(() => finish(`no answer in ${DEADLINE_MS} ms`), DEADLINE_MS);
    session.on('error', (err) => finish(`session error: ${String(err)}`));
    const req = session.request({
      ':method': 'POST',
      ':path': pathName,
      'content-type': 'application/grpc',
      te: 'trailers',
      ...headers,
    });
    const take = (h: http2.IncomingHttpHeaders) => {
      if (h['grpc-status'] !== undefined) grpcStatus = Number(h['grpc-status']);
      if (h['grpc-message'] !== undefined) message = decodeURIComponent(String(h['grpc-message']));
    };
    req.on('response', (h) => {
      httpStatus = Number(h[':status']);
      take(h);
    });
    req.on('trailers', (h) => {
      take(h);
      finish();
    });
    req.on('data', () => undefined);
    req.on('close', () => finish('stream closed without trailers'));
    req.on('error', (err) => finish(`stream error: ${String(err)}`));
    req.end(Buffer.from(body));
  });
}

function envelope(flags: number, payload: Uint8Array, declaredLength = payload.length): Uint8Array {
  const head = Buffer.alloc(5);
  head.writeUInt8(flags, 0);
  head.writeUInt32BE(declaredLength >>> 0, 1);
  return Buffer.concat([head, payload]);
}

type Framing =
  | { kind: 'unframed'; bytes: Uint8Array }
  | { kind: 'short'; missing: number }
  | { kind: 'compressed-no-encoding' }
  | { kind: 'compressed-bad-gzip' }
  | { kind: 'unknown-encoding' }
  | { kind: 'two-messages' }
  | { kind: 'empty' }
  | { kind: 'oversized' }
  | { kind: 'timeout-header'; value: string }
  | { kind: 'flags'; flags: number };

function framingArb(): fc.Arbitrary<Framing> {
  return fc.oneof(
    fc.uint8Array({ minLength: 1, maxLength: 12 }).map((bytes): Framing => ({ kind: 'unframed', bytes })),
    fc.integer({ min: 1, max: 1 << 20 }).map((missing): Framing => ({ kind: 'short', missing })),
    fc.constant<Framing>({ kind: 'compressed-no-encoding' }),
    fc.constant<Framing>({ kind: 'compressed-bad-gzip' }),
    fc.constant<Framing>({ kind: 'unknown-encoding' }),
    fc.constant<Framing>({ kind: 'two-messages' }),
    fc.constant<Framing>({ kind: 'empty' }),
    fc.constant<Framing>({ kind: 'oversized' }),
    // Malformed grpc-timeout values, and 0n: a well-formed deadline that has already passed.
    fc
      .constantFrom('-1S', '99999999999H', 'abc', '1', '0n', '')
      .map((value): Framing => ({ kind: 'timeout-header', value })),
    fc.integer({ min: 2, max: 255 }).map((flags): Framing => ({ kind: 'flags', flags })),
  );
}

function framedRequest(f: Framing, payload: Uint8Array): { headers: http2.OutgoingHttpHeaders; body: Uint8Array } {
  switch (f.kind) {
    case 'unframed':
      return { headers: {}, body: f.bytes };
    case 'short':
      return { headers: {}, body: envelope(0, payload, payload.length + f.missing) };
    case 'compressed-no-encoding':
      return { headers: {}, body: envelope(1, payload) };
    case 'compressed-bad-gzip':
      return { headers: { 'grpc-encoding': 'gzip' }, body: envelope(1, payload) };
    case 'unknown-encoding':
      return { headers: { 'grpc-encoding': 'lz77-made-up' }, body: envelope(1, payload) };
    case 'two-messages':
      return { headers: {}, body: Buffer.concat([envelope(0, payload), envelope(0, payload)]) };
    case 'empty':
      return { headers: {}, body: new Uint8Array(0) };
    case 'oversized':
      return { headers: {}, body: envelope(0, new Uint8Array(5 * 1024 * 1024)) };
    case 'timeout-header':
      return { headers: { 'grpc-timeout': f.value }, body: envelope(0, payload) };
    case 'flags':
      return { headers: {}, body: envelope(f.flags, payload) };
  }
}

// ------------------------------------------------------------------------------------------------------------

const ALL_METHODS = SERVICES.flatMap((s) => s.methods.map((m) => m));

describe('fuzz: the running driver answers random and malformed requests with spec statuses and survives', () => {
  beforeAll(async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-csi-fuzz-'));
    const socket = path.join(dir, 'csi.sock');
    const started = await spawnDriver([
      '--endpoint',
      `unix://${socket}`,
      '--state-dir',
      path.join(dir, 'state'),
      '--node-id',
      NODE_ID,
      '--log-level',
      'error',
    ]);
    const target = `unix://${socket}`;
    fx = {
      dir,
      child: started.child,
      stderr: started.stderr,
      stdout: started.stdout,
      target,
      identity: new ServiceClient(Identity, target),
      controller: new ServiceClient(Controller, target),
      metadata: new ServiceClient(SnapshotMetadata, target),
      raw: new grpc.Client(target, grpc.credentials.createInsecure(), {
        'grpc.max_receive_message_length': 64 * 1024 * 1024,
      }),
    };
    await setUpObjects();
  });

  afterAll(async () => {
    if (fx === undefined) return;
    const lines = [...histogram].map(
      ([rpc, row]) => `${rpc.padEnd(48)} ${[...row].map(([c, n]) => `${c}=${n}`).join(' ')}`,
    );
    if (lines.length > 0) process.stderr.write(`fuzz status counts:\n${lines.join('\n')}\n`);
    fx.identity.close();
    fx.controller.close();
    fx.metadata.close();
    fx.raw.close();
    if (childAlive()) {
      const exited = new Promise((resolve) => fx.child.once('exit', resolve));
      fx.child.kill('SIGTERM');
      await Promise.race([exited, new Promise((resolve) => setTimeout(resolve, 10_000))]);
      if (childAlive()) fx.child.kill('SIGKILL');
    }
    fs.rmSync(fx.dir, { recursive: true, force: true });
  });

  for (const method of ALL_METHODS) {
    const rpc = `${method.parent.name}.${method.name}`;
    it(`${rpc}: ${RUNS} random requests get OK or a spec error status, and the driver stays up`, async () => {
      await fuzz(requestArb(method), RUNS, async (generated) => {
        const init = sparePreserved(method, resolveRefs(generated) as Init);
        const bytes = toBinary(method.input, create(method.input, init as never));
        const outcome = await send(method, bytes);
        count(rpc, outcome.code);
        const problem = judge(method, outcome);
        return problem && `${rpc} ${printable(method, init)}\n→ ${problem}`;
      });
    });
  }

  for (const method of ALL_METHODS) {
    const rpc = `${method.parent.name}.${method.name}`;
    it(`${rpc}: ${RAW_RUNS} raw byte payloads (garbage, mutated, hand-made protobuf) get a spec status`, async () => {
      await fuzz(rawArb(method), RAW_RUNS, async (value) => {
        let bytes: Uint8Array;
        if (value.bytes) bytes = value.bytes;
        else {
          const desc = value.desc!;
          let init = resolveRefs(value.init) as Init;
          if (desc === method.input) init = sparePreserved(method, init);
          bytes = toBinary(desc, create(desc, init as never));
        }
        bytes = applyMutations(bytes, value.mutations);
        // Mutated bytes can decode as a delete of a preserved object; that would be a legitimate delete.
        const decoded = (() => {
          try {
            return fromBinary(method.input, bytes) as unknown as Init;
          } catch {
            return undefined;
          }
        })();
        if (decoded && sparePreserved(method, decoded) !== decoded) return undefined;
        const outcome = await send(method, bytes);
        count(`${rpc} (raw)`, outcome.code);
        const problem = judge(method, outcome);
        return (
          problem &&
          `${rpc} raw bytes ${Buffer.from(bytes.subarray(0, 256)).toString('hex')}${bytes.length > 256 ? `… (${bytes.length} bytes)` : ''}\n→ ${problem}`
        );
      });
    });
  }

  const BATCH = 8;
  it(`mixed RPCs ${BATCH} at a time (creates, deletes, snapshots and queries racing on the same names and IDs) get spec statuses`, async () => {
    // Weighted towards the RPCs that change state, so that they race each other.
    const mutating = new Set([
      'CreateVolume',
      'DeleteVolume',
      'CreateSnapshot',
      'DeleteSnapshot',
      'ControllerExpandVolume',
    ]);
    const method = fc.oneof(
      { weight: 3, arbitrary: fc.constantFrom(...ALL_METHODS.filter((m) => mutating.has(m.name))) },
      { weight: 1, arbitrary: fc.constantFrom(...ALL_METHODS.filter((m) => !mutating.has(m.name))) },
    );
    const call = method.chain((m) => requestArb(m).map((init) => ({ method: m, init })));
    await fuzz(
      fc.array(call, { minLength: BATCH, maxLength: BATCH }),
      Math.max(10, Math.round(RUNS / 5)),
      async (batch) => {
        const outcomes = await Promise.all(
          batch.map(async ({ method, init: generated }) => {
            const init = sparePreserved(method, resolveRefs(generated) as Init);
            const outcome = await send(method, toBinary(method.input, create(method.input, init as never)));
            count(`${method.name} (concurrent)`, outcome.code);
            return { method, init, outcome };
          }),
        );
        for (const { method, init, outcome } of outcomes) {
          const problem = judge(method, outcome);
          if (problem)
            return `${method.parent.name}.${method.name} ${printable(method, init)} (one of ${BATCH} at once)\n→ ${problem}`;
        }
        return undefined;
      },
    );
  });

  it('broken gRPC framing (unframed, short, compressed without codec, two messages, oversized, bad timeout) gets a spec status (DEADLINE_EXCEEDED for an expired deadline)', async () => {
    const socket = fx.target.slice('unix://'.length);
    const arb = fc.tuple(fc.constantFrom(...ALL_METHODS), framingArb());
    await fuzz(arb, Math.max(30, RAW_RUNS), async ([method, framing]) => {
      const payload = toBinary(method.input, create(method.input, {}));
      const { headers, body } = framedRequest(framing, payload);
      const res = await h2Request(socket, `/${method.parent.typeName}/${method.name}`, headers, body);
      const code = res.grpcStatus ?? -1;
      count('framing', code);
      if (!childAlive()) return `the driver exited after ${JSON.stringify(framing)} to ${method.name}`;
      const expired = framing.kind === 'timeout-header' && /^\d{1,8}[HMSmun]$/.test(framing.value);
      const allowed = expired
        ? res.grpcStatus === grpc.status.DEADLINE_EXCEEDED || ALLOWED.has(res.grpcStatus ?? -1)
        : ALLOWED.has(res.grpcStatus ?? -1);
      if (res.grpcStatus === undefined || !allowed) {
        return `${method.name} ${JSON.stringify(framing, (_k, v: unknown) => (v instanceof Uint8Array ? Buffer.from(v).toString('hex') : v))} → HTTP ${res.httpStatus}, grpc-status ${res.grpcStatus} "${res.message}"`;
      }
      return undefined;
    });
  });

  it('after the fuzz, the volumes and snapshots made before it are listed unchanged and report the same metadata', async () => {
    expect(childAlive()).toBe(true);
    const volumes: Volume[] = [];
    let token = '';
    do {
      const page = await fx.controller.call('listVolumes', { startingToken: token });
      volumes.push(...page.entries.map((e) => e.volume!));
      token = page.nextToken;
    } while (token !== '');
    const snapshots: Snapshot[] = [];
    token = '';
    do {
      const page = await fx.controller.call('listSnapshots', { startingToken: token });
      snapshots.push(...page.entries.map((e: ListSnapshotsResponse_Entry) => e.snapshot!));
      token = page.nextToken;
    } while (token !== '');

    const volumeView = (v: Volume) => ({
      id: v.volumeId,
      capacity: String(v.capacityBytes),
      source: v.contentSource ? toJson(VolumeContentSourceSchema, v.contentSource) : null,
    });
    for (const before of pools.preservedVolumes) {
      const after = volumes.find((v) => v.volumeId === before.volumeId);
      expect(after, `volume ${before.volumeId} is still listed`).toBeDefined();
      expect(volumeView(after!)).toEqual(volumeView(before));
    }
    const snapshotView = (s: Snapshot) => ({
      id: s.snapshotId,
      source: s.sourceVolumeId,
      size: String(s.sizeBytes),
      ready: s.readyToUse,
      created: s.creationTime ? `${s.creationTime.seconds}.${s.creationTime.nanos}` : null,
    });
    for (const before of pools.preservedSnapshots) {
      const after = snapshots.find((s) => s.snapshotId === before.snapshotId);
      expect(after, `snapshot ${before.snapshotId} is still listed`).toBeDefined();
      expect(snapshotView(after!)).toEqual(snapshotView(before));
      expect(await allocatedOf(before.snapshotId)).toBe(allocatedBefore.get(before.snapshotId));
    }
    expect(childAlive()).toBe(true);
  });
});
