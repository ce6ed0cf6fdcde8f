/**
 * Which fields of CSI messages hold object handles (volume, snapshot and group snapshot IDs), and walks
 * over them. One list, applied by field name to the generated descriptors, so a method added later whose
 * request names an object is routed like the others. A test classifies every `*_id`/`*_ids` field of the
 * CSI proto as one or the other, and fails when a new one appears unclassified.
 */
import { type DescField, type DescMessage, ScalarType } from '@bufbuild/protobuf';

/** Fields (proto names) whose strings are handles of objects in some node's store. */
export const OBJECT_ID_FIELDS: ReadonlySet<string> = new Set([
  'volume_id',
  'source_volume_id',
  'source_volume_ids',
  'snapshot_id',
  'base_snapshot_id',
  'target_snapshot_id',
  'snapshot_ids',
  'group_snapshot_id',
]);

/** `*_id` fields that are not object handles: node names, which the CO gives and routing never reads. */
export const NOT_OBJECT_ID_FIELDS: ReadonlySet<string> = new Set(['node_id', 'published_node_ids']);

function isIdField(field: DescField): boolean {
  if (!OBJECT_ID_FIELDS.has(field.name)) return false;
  if (field.fieldKind === 'scalar') return field.scalar === ScalarType.STRING;
  return field.fieldKind === 'list' && field.listKind === 'scalar' && field.scalar === ScalarType.STRING;
}

const holdsIds = new WeakMap<DescMessage, boolean>();

/** Whether a message of this type can hold a handle anywhere inside it (memoized; cycles end as false). */
export function mayHoldIds(desc: DescMessage): boolean {
  const known = holdsIds.get(desc);
  if (known !== undefined) return known;
  holdsIds.set(desc, false);
  const answer = desc.fields.some((field) => {
    if (isIdField(field)) return true;
    if (field.fieldKind === 'message') return mayHoldIds(field.message);
    if (field.fieldKind === 'list' && field.listKind === 'message') return mayHoldIds(field.message);
    return false;
  });
  holdsIds.set(desc, answer);
  return answer;
}

/** A message or its init shape: fields by local name, a oneof as `{ case, value }`. */
type Fields = Record<string, unknown>;

/**
 * Replaces every non-empty handle in `message` (of type `desc`, a message or its init shape) by `map(handle)`,
 * in place. Maps (parameters, secrets, contexts) are never handles and are left alone.
 */
export function mapIds(desc: DescMessage, message: object, map: (handle: string) => string): void {
  if (!mayHoldIds(desc)) return;
  const fields = message as Fields;
  for (const field of desc.fields) {
    let holder = fields;
    let key = field.localName;
    if (field.oneof) {
      const chosen = fields[field.oneof.localName] as { case?: string; value?: unknown } | undefined;
      if (!chosen || chosen.case !== field.localName) continue;
      holder = chosen as Fields;
      key = 'value';
    }
    const value = holder[key];
    if (value === undefined || value === null) continue;
    if (isIdField(field)) {
      if (typeof value === 'string') holder[key] = value === '' ? value : map(value);
      else if (Array.isArray(value))
        holder[key] = value.map((id: unknown) => (typeof id === 'string' && id !== '' ? map(id) : id));
      continue;
    }
    if (field.fieldKind === 'message') mapIds(field.message, value as object, map);
    else if (field.fieldKind === 'list' && field.listKind === 'message' && Array.isArray(value)) {
      for (const item of value) mapIds(field.message, item as object, map);
    }
  }
}

/** Every non-empty handle in `message`. */
export function idsIn(desc: DescMessage, message: object): string[] {
  const ids: string[] = [];
  mapIds(desc, message, (id) => {
    ids.push(id);
    return id;
  });
  return ids;
}
