/**
 * What the store knows of its volumes and snapshots, in memory: lookup by ID and by name, the rules for
 * creating the same name twice (idempotent if the arguments match, ALREADY_EXISTS if not), holds that keep
 * a volume from deletion while in use, and the provisioning limit. Catalog rows convert to and from here.
 */
import type { SnapshotRow, VolumeRow } from './catalog.js';
import { AlreadyExistsError, BusyError, NoSpaceError, NotFoundError } from './errors.js';
import { isGroupId, isSnapshotId, isVolumeId } from './ids.js';
import type { Attributes, SnapshotInfo, VolumeInfo } from './types.js';

export interface VolumeRecord {
  id: string;
  name: string | undefined;
  capacityBytes: number;
  blockSize: number;
  headId: number;
  source: VolumeInfo['source'];
  attributes: Attributes;
  createdAtMs: number;
}

export interface SnapshotRecord {
  id: string;
  name: string | undefined;
  /** Set once the snapshot is a group's member (see Records.addGroup). */
  groupId?: string;
  sourceVolumeId: string;
  layerId: number;
  capacityBytes: number;
  blockSize: number;
  attributes: Attributes;
  createdAtMs: number;
}

export interface GroupRecord {
  id: string;
  name: string | undefined;
  snapshotIds: string[];
  createdAtMs: number;
}

/** What a volume creation asks for, once validated: compared field by field with a same-name volume. */
export interface VolumeWish {
  name: string | undefined;
  capacityBytes: number;
  blockSize: number;
  source: VolumeInfo['source'];
  attributes: Attributes;
}

export class Records {
  readonly volumes = new Map<string, VolumeRecord>();
  readonly snapshots = new Map<string, SnapshotRecord>();
  private readonly volumeNames = new Map<string, VolumeRecord>();
  private readonly snapshotNames = new Map<string, SnapshotRecord>();
  private readonly holds = new Map<string, Set<string>>();
  readonly groups = new Map<string, GroupRecord>();
  private readonly groupNames = new Map<string, GroupRecord>();

  constructor(private readonly capacityLimitBytes: number | undefined) {}

  // ---------------------------------------------------------------- volumes

  addVolume(record: VolumeRecord): void {
    this.volumes.set(record.id, record);
    if (record.name !== undefined) this.volumeNames.set(record.name, record);
  }

  removeVolume(id: string): void {
    const record = this.volumes.get(id);
    if (!record) return;
    this.volumes.delete(id);
    if (record.name !== undefined) this.volumeNames.delete(record.name);
    this.holds.delete(id);
  }

  volume(id: string): VolumeRecord {
    const vol = isVolumeId(id) ? this.volumes.get(id) : undefined;
    if (!vol) throw new NotFoundError(`volume ${JSON.stringify(String(id).slice(0, 128))} does not exist`);
    return vol;
  }

  volumeNamed(name: string): VolumeRecord | undefined {
    return this.volumeNames.get(name);
  }

  /** The existing volume of the same name if its arguments match; ALREADY_EXISTS if they do not. */
  sameNameVolume(wanted: VolumeWish): VolumeRecord | undefined {
    if (wanted.name === undefined) return undefined;
    const existing = this.volumeNames.get(wanted.name);
    if (!existing) return undefined;
    const same =
      existing.capacityBytes === wanted.capacityBytes &&
      existing.blockSize === wanted.blockSize &&
      JSON.stringify(existing.source ?? null) === JSON.stringify(wanted.source ?? null) &&
      sameAttributes(existing.attributes, wanted.attributes);
    if (!same) {
      throw new AlreadyExistsError(`a volume named ${JSON.stringify(wanted.name)} exists with different properties`);
    }
    return existing;
  }

  // ---------------------------------------------------------------- snapshots

  addSnapshot(record: SnapshotRecord): void {
    this.snapshots.set(record.id, record);
    if (record.name !== undefined) this.snapshotNames.set(record.name, record);
  }

  removeSnapshot(id: string): void {
    const record = this.snapshots.get(id);
    if (!record) return;
    this.snapshots.delete(id);
    if (record.name !== undefined) this.snapshotNames.delete(record.name);
  }

  snapshot(id: string): SnapshotRecord {
    const snap = isSnapshotId(id) ? this.snapshots.get(id) : undefined;
    if (!snap) throw new NotFoundError(`snapshot ${JSON.stringify(String(id).slice(0, 128))} does not exist`);
    return snap;
  }

  snapshotNamed(name: string): SnapshotRecord | undefined {
    return this.snapshotNames.get(name);
  }

  /** The existing snapshot of the same name if it is of the same volume; ALREADY_EXISTS if not. */
  sameNameSnapshot(name: string | undefined, volumeId: string): SnapshotRecord | undefined {
    if (name === undefined) return undefined;
    const existing = this.snapshotNames.get(name);
    if (!existing) return undefined;
    if (existing.sourceVolumeId !== volumeId) {
      throw new AlreadyExistsError(
        `a snapshot named ${JSON.stringify(name)} exists for another volume (${existing.sourceVolumeId})`,
      );
    }
    return existing;
  }

  // ---------------------------------------------------------------- group snapshots

  /** Records a group; its member snapshots must be added first. */
  addGroup(record: GroupRecord): void {
    this.groups.set(record.id, record);
    if (record.name !== undefined) this.groupNames.set(record.name, record);
    for (const id of record.snapshotIds) {
      const member = this.snapshots.get(id);
      if (member) member.groupId = record.id;
    }
  }

  removeGroup(id: string): void {
    const record = this.groups.get(id);
    if (!record) return;
    this.groups.delete(id);
    if (record.name !== undefined) this.groupNames.delete(record.name);
    for (const snapshotId of record.snapshotIds) this.removeSnapshot(snapshotId);
  }

  group(id: string): GroupRecord {
    const group = isGroupId(id) ? this.groups.get(id) : undefined;
    if (!group) throw new NotFoundError(`group snapshot ${JSON.stringify(String(id).slice(0, 128))} does not exist`);
    return group;
  }

  /** The existing group of the same name if it is of the same volumes; ALREADY_EXISTS if not. */
  sameNameGroup(name: string | undefined, volumeIds: readonly string[]): GroupRecord | undefined {
    if (name === undefined) return undefined;
    const existing = this.groupNames.get(name);
    if (!existing) return undefined;
    const theirs = existing.snapshotIds.map((id) => this.snapshots.get(id)?.sourceVolumeId ?? '').sort();
    const ours = [...volumeIds].sort();
    if (theirs.length !== ours.length || theirs.some((v, i) => v !== ours[i])) {
      throw new AlreadyExistsError(`a group snapshot named ${JSON.stringify(name)} exists of other volumes`);
    }
    return existing;
  }

  // ---------------------------------------------------------------- holds and limits

  hold(volumeId: string, holder: string): void {
    this.volume(volumeId);
    let set = this.holds.get(volumeId);
    if (!set) {
      set = new Set();
      this.holds.set(volumeId, set);
    }
    set.add(holder);
  }

  release(volumeId: string, holder: string): void {
    const set = this.holds.get(volumeId);
    set?.delete(holder);
    if (set && set.size === 0) this.holds.delete(volumeId);
  }

  checkNotHeld(id: string): void {
    const holders = this.holds.get(id);
    if (holders && holders.size > 0) {
      throw new BusyError(`volume ${id} is in use by ${[...holders].join(', ')}`);
    }
  }

  provisionedBytes(): number {
    let total = 0;
    for (const vol of this.volumes.values()) total += vol.capacityBytes;
    return total;
  }

  /** Refuses provisioning past the store's limit (replacing `current` bytes with `wanted`). */
  checkProvisioning(wanted: number, current: number): void {
    if (this.capacityLimitBytes === undefined) return;
    const after = this.provisionedBytes() - current + wanted;
    if (after > this.capacityLimitBytes) {
      throw new NoSpaceError(
        `provisioning ${wanted} bytes would take the store to ${after} of its ${this.capacityLimitBytes} bytes`,
      );
    }
  }

  /** Layers a volume or snapshot names: volume heads and snapshot layers. */
  referencedLayers(): Set<number> {
    const referenced = new Set<number>();
    for (const vol of this.volumes.values()) referenced.add(vol.headId);
    for (const snap of this.snapshots.values()) referenced.add(snap.layerId);
    return referenced;
  }
}

function sameAttributes(a: Attributes, b: Attributes): boolean {
  const ka = Object.keys(a).sort();
  const kb = Object.keys(b).sort();
  return ka.length === kb.length && ka.every((k, i) => k === kb[i] && a[k] === b[k]);
}

// ---------------------------------------------------------------- conversions

export function volumeInfo(v: VolumeRecord): VolumeInfo {
  return {
    id: v.id,
    name: v.name,
    capacityBytes: v.capacityBytes,
    blockSize: v.blockSize,
    source: v.source && { ...v.source },
    attributes: { ...v.attributes },
    createdAtMs: v.createdAtMs,
  };
}

export function snapshotInfo(s: SnapshotRecord): SnapshotInfo {
  return {
    id: s.id,
    name: s.name,
    groupId: s.groupId,
    sourceVolumeId: s.sourceVolumeId,
    capacityBytes: s.capacityBytes,
    blockSize: s.blockSize,
    attributes: { ...s.attributes },
    createdAtMs: s.createdAtMs,
  };
}

export function volumeRow(v: VolumeRecord): VolumeRow {
  return {
    id: v.id,
    name: v.name ?? null,
    capacity_bytes: v.capacityBytes,
    block_size: v.blockSize,
    head_layer_id: v.headId,
    source_kind: v.source?.kind ?? null,
    source_id: v.source ? (v.source.kind === 'snapshot' ? v.source.snapshotId : v.source.volumeId) : null,
    attributes: JSON.stringify(v.attributes),
    created_at_ms: v.createdAtMs,
  };
}

export function snapshotRow(s: SnapshotRecord): SnapshotRow {
  return {
    id: s.id,
    name: s.name ?? null,
    source_volume_id: s.sourceVolumeId,
    layer_id: s.layerId,
    capacity_bytes: s.capacityBytes,
    block_size: s.blockSize,
    attributes: JSON.stringify(s.attributes),
    created_at_ms: s.createdAtMs,
  };
}

export function volumeFromRow(row: VolumeRow): VolumeRecord {
  return {
    id: row.id,
    name: row.name ?? undefined,
    capacityBytes: row.capacity_bytes,
    blockSize: row.block_size,
    headId: row.head_layer_id,
    source:
      row.source_kind === 'snapshot'
        ? { kind: 'snapshot', snapshotId: row.source_id ?? '' }
        : row.source_kind === 'volume'
          ? { kind: 'volume', volumeId: row.source_id ?? '' }
          : undefined,
    attributes: JSON.parse(row.attributes) as Attributes,
    createdAtMs: row.created_at_ms,
  };
}

export function snapshotFromRow(row: SnapshotRow): SnapshotRecord {
  return {
    id: row.id,
    name: row.name ?? undefined,
    sourceVolumeId: row.source_volume_id,
    layerId: row.layer_id,
    capacityBytes: row.capacity_bytes,
    blockSize: row.block_size,
    attributes: JSON.parse(row.attributes) as Attributes,
    createdAtMs: row.created_at_ms,
  };
}
