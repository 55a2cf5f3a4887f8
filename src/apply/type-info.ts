/**
 * The structure server-side apply needs, read from an OpenAPI v3 / JSON Schema, in the shape of
 * structured-merge-diff's schema (sigs.k8s.io/structured-merge-diff `schema`), as kube builds it for
 * a CustomResourceDefinition:
 *
 *   - an object with `properties` is a struct: each declared field is tracked separately
 *     (`additionalProperties` / `patternProperties` next to them give the type of other keys);
 *   - an object with only `additionalProperties` / `patternProperties` is a granular map: each key
 *     is tracked (e.g. `metadata.labels`);
 *   - `x-kubernetes-map-type: atomic` objects, scalars and fields the schema does not declare are
 *     leaves (owned and replaced whole);
 *   - arrays are atomic unless `x-kubernetes-list-type` is `map` (items keyed by
 *     `x-kubernetes-list-map-keys`, each item and its fields tracked) or `set` (scalar items
 *     tracked by value);
 *   - `x-kubernetes-preserve-unknown-fields` objects without properties are "deduced": maps are
 *     granular, lists atomic, as structured-merge-diff's deduced type.
 *
 * `metadata` of the root object always uses the built-in ObjectMeta structure (labels and
 * annotations granular maps, finalizers a set, ownerReferences a map list keyed by uid of atomic
 * items, managedFields atomic), as kube does for custom resources whatever the CRD schema says.
 */
import { compareStrings, goJSON, keyPESorted, valuePE, type JsonObject } from './field-set.ts';

export type TypeNode = LeafType | MapType | ListType | DeducedType;

export interface LeafType {
  readonly kind: 'leaf';
}

export interface MapType {
  readonly kind: 'map';
  /** Declared fields (structs); empty for plain maps. */
  readonly fields: ReadonlyMap<string, TypeNode>;
  /** Type of keys that are not declared fields; undefined when the struct allows none. */
  readonly elem: TypeNode | undefined;
  readonly atomic: boolean;
}

export interface ListType {
  readonly kind: 'list';
  readonly rel: 'atomic' | 'set' | 'map';
  readonly keys: readonly string[];
  /** Defaults of key fields, used when an item omits one. */
  readonly keyDefaults: ReadonlyMap<string, unknown>;
  readonly elem: TypeNode;
  /** Key names sorted, and their JSON (precomputed for {@link listItemPE}). */
  readonly sortedKeys: readonly string[];
  readonly encodedKeys: readonly string[];
}

export function listType(
  rel: ListType['rel'],
  keys: readonly string[],
  keyDefaults: ReadonlyMap<string, unknown>,
  elem: TypeNode | (() => TypeNode),
): ListType {
  const sortedKeys = [...keys].sort(compareStrings);
  return {
    kind: 'list',
    rel,
    keys,
    keyDefaults,
    get elem() {
      return typeof elem === 'function' ? elem() : elem;
    },
    sortedKeys,
    encodedKeys: sortedKeys.map((k) => goJSON(k)),
  };
}

export interface DeducedType {
  readonly kind: 'deduced';
}

export const LEAF: LeafType = { kind: 'leaf' };
export const DEDUCED: DeducedType = { kind: 'deduced' };
const DEDUCED_MAP: MapType = { kind: 'map', fields: new Map(), elem: DEDUCED, atomic: false };

/** Resolves a deduced type from the value (objects are granular maps, everything else a leaf). */
export function resolveType(t: TypeNode, value: unknown): LeafType | MapType | ListType {
  if (t.kind !== 'deduced') return t;
  return typeof value === 'object' && value !== null && !Array.isArray(value) ? DEDUCED_MAP : LEAF;
}

export class FieldManagerError extends Error {
  /** Path of the offending value, like `.status.modules`. */
  readonly path: string;
  constructor(path: string, message: string) {
    super(path ? `${path}: ${message}` : message);
    this.name = 'FieldManagerError';
    this.path = path;
  }
}

function isPlainObject(v: unknown): v is JsonObject {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** Compiles a JSON Schema into {@link TypeNode}s (lazily, so recursive `$ref`s are fine). */
export function compileSchema(root: JsonObject): MapType {
  const cache = new Map<JsonObject, TypeNode>();

  const deref = (s: JsonObject): JsonObject => {
    const seen = new Set<string>();
    let cur = s;
    while (typeof cur['$ref'] === 'string') {
      const ref = cur['$ref'];
      if (seen.has(ref) || !ref.startsWith('#')) return cur;
      seen.add(ref);
      let target: unknown = root;
      for (const raw of ref.slice(1).split('/').filter((p) => p !== '')) {
        const part = decodeURIComponent(raw).replace(/~1/g, '/').replace(/~0/g, '~');
        target = isPlainObject(target) ? target[part] : undefined;
      }
      if (!isPlainObject(target)) return cur;
      cur = target;
    }
    return cur;
  };

  /** Picks the schema describing non-null values among anyOf/oneOf alternatives. */
  const effective = (s: JsonObject): JsonObject => {
    s = deref(s);
    if (s['type'] !== undefined || s['properties'] !== undefined || s['items'] !== undefined) return s;
    for (const key of ['anyOf', 'oneOf', 'allOf']) {
      const alts = s[key];
      if (!Array.isArray(alts)) continue;
      for (const alt of alts) {
        if (!isPlainObject(alt)) continue;
        const e = effective(alt);
        const t = e['type'];
        if (t === 'null') continue;
        if (t !== undefined || e['properties'] !== undefined || e['items'] !== undefined) {
          // Keep the kube annotations of the outer schema.
          return { ...e, ...pickExtensions(s) };
        }
      }
    }
    return s;
  };

  const typeOf = (s: JsonObject): string | undefined => {
    const t = s['type'];
    if (typeof t === 'string') return t;
    if (Array.isArray(t)) return t.find((x) => x !== 'null') as string | undefined;
    if (s['properties'] !== undefined || s['additionalProperties'] !== undefined || s['patternProperties'] !== undefined) return 'object';
    if (s['items'] !== undefined) return 'array';
    return undefined;
  };

  const compile = (input: JsonObject): TypeNode => {
    const hit = cache.get(input);
    if (hit) return hit;
    const s = effective(input);
    const derefHit = cache.get(s);
    if (derefHit) return remember(input, derefHit);
    if (s['x-kubernetes-int-or-string'] === true) return remember(input, LEAF);
    const type = typeOf(s);
    if (type === 'object') {
      const props = isPlainObject(s['properties']) ? s['properties'] : undefined;
      const atomic = s['x-kubernetes-map-type'] === 'atomic';
      const preserve = s['x-kubernetes-preserve-unknown-fields'] === true;
      const fields = new Map<string, TypeNode>();
      const node: { kind: 'map'; fields: Map<string, TypeNode>; elem: TypeNode | undefined; atomic: boolean } = {
        kind: 'map',
        fields,
        elem: undefined,
        atomic,
      };
      cache.set(input, node);
      cache.set(s, node);
      if (props) for (const [name, sub] of Object.entries(props)) fields.set(name, isPlainObject(sub) ? compileLazy(sub) : LEAF);
      node.elem = elementOf(s, preserve);
      return node;
    }
    if (type === 'array') {
      const declared = s['x-kubernetes-list-type'];
      const rel = declared === 'map' ? 'map' : declared === 'set' ? 'set' : 'atomic';
      const items = isPlainObject(s['items']) ? s['items'] : {};
      const keys = rel === 'map' && Array.isArray(s['x-kubernetes-list-map-keys']) ? (s['x-kubernetes-list-map-keys'] as unknown[]).filter((k): k is string => typeof k === 'string') : [];
      const keyDefaults = new Map<string, unknown>();
      const itemProps = effective(items)['properties'];
      if (isPlainObject(itemProps)) {
        for (const k of keys) {
          const ks = itemProps[k];
          if (isPlainObject(ks) && 'default' in ks) keyDefaults.set(k, ks['default']);
        }
      }
      let elem: TypeNode | undefined;
      const node: ListType = listType(
        // structured-merge-diff: an associative list without keys is a set.
        rel === 'map' && keys.length === 0 ? 'set' : rel,
        keys,
        keyDefaults,
        () => (elem ??= compile(items)),
      );
      return remember(input, node);
    }
    if (type === undefined && s['x-kubernetes-preserve-unknown-fields'] === true) return remember(input, DEDUCED);
    return remember(input, LEAF);
  };

  const elementOf = (s: JsonObject, preserve: boolean): TypeNode | undefined => {
    const ap = s['additionalProperties'];
    if (isPlainObject(ap)) return compileLazy(ap);
    const pp = s['patternProperties'];
    if (isPlainObject(pp)) {
      const first = Object.values(pp).find(isPlainObject);
      if (first) return compileLazy(first);
    }
    if (ap === true || preserve) return DEDUCED;
    const props = s['properties'];
    // `type: object` with nothing else: structured-merge-diff treats it as a map of anything.
    if (!isPlainObject(props) && ap === undefined && pp === undefined) return DEDUCED;
    return undefined;
  };

  /** Defers compiling a sub-schema until first use (recursive schemas). */
  const compileLazy = (s: JsonObject): TypeNode => {
    const hit = cache.get(s);
    if (hit) return hit;
    return compile(s);
  };

  const remember = <T extends TypeNode>(s: JsonObject, t: T): T => {
    cache.set(s, t);
    return t;
  };

  const compiled = compile(root);
  if (compiled.kind !== 'map') throw new Error('the schema of the object must be an object');
  const fields = new Map(compiled.fields);
  fields.set('metadata', OBJECT_META);
  if (!fields.has('apiVersion')) fields.set('apiVersion', LEAF);
  if (!fields.has('kind')) fields.set('kind', LEAF);
  return { kind: 'map', fields, elem: compiled.elem, atomic: false };
}

function pickExtensions(s: JsonObject): JsonObject {
  const out: JsonObject = {};
  for (const [k, v] of Object.entries(s)) if (k.startsWith('x-kubernetes-')) out[k] = v;
  return out;
}

const STRING_MAP: MapType = { kind: 'map', fields: new Map(), elem: LEAF, atomic: false };

/** k8s.io/apimachinery ObjectMeta as kube publishes it (`+listType`, `+structType` markers). */
export const OBJECT_META: MapType = {
  kind: 'map',
  atomic: false,
  elem: undefined,
  fields: new Map<string, TypeNode>([
    ['annotations', STRING_MAP],
    ['creationTimestamp', LEAF],
    ['deletionGracePeriodSeconds', LEAF],
    ['deletionTimestamp', LEAF],
    ['finalizers', listType('set', [], new Map(), LEAF)],
    ['generateName', LEAF],
    ['generation', LEAF],
    ['labels', STRING_MAP],
    ['managedFields', listType('atomic', [], new Map(), LEAF)],
    ['name', LEAF],
    ['namespace', LEAF],
    [
      'ownerReferences',
      listType('map', ['uid'], new Map(), {
        kind: 'map',
        atomic: true,
        elem: undefined,
        fields: new Map<string, TypeNode>(['apiVersion', 'blockOwnerDeletion', 'controller', 'kind', 'name', 'uid'].map((n) => [n, LEAF] as const)),
      }),
    ],
    ['resourceVersion', LEAF],
    ['selfLink', LEAF],
    ['uid', LEAF],
  ]),
};

/** Type of the value under `name` in a map/struct; undeclared fields of a struct are leaves. */
export function fieldType(t: MapType, name: string): TypeNode {
  return t.fields.get(name) ?? t.elem ?? LEAF;
}

/** True when `name` is a declared field (structured-merge-diff `Map.FindField`). */
export function isDeclaredField(t: MapType, name: string): boolean {
  return t.fields.has(name);
}

/**
 * The path element of a list item, or a {@link FieldManagerError} as structured-merge-diff words it.
 * `path` and `index` only serve the message.
 */
export function listItemPE(t: ListType, item: unknown, path: string, index: number): string {
  if (t.rel === 'map') {
    if (item === null) throw new FieldManagerError(path, `element ${index}: associative list with keys may not have a null element`);
    if (!isPlainObject(item)) throw new FieldManagerError(path, `element ${index}: associative list with keys may not have non-map elements`);
    const values: unknown[] = [];
    for (const k of t.sortedKeys) {
      const v = Object.prototype.hasOwnProperty.call(item, k) ? item[k] : undefined;
      if (v !== undefined) values.push(v);
      else if (t.keyDefaults.has(k)) values.push(t.keyDefaults.get(k));
      else {
        const missing = t.keys.find((key) => !Object.prototype.hasOwnProperty.call(item, key) || item[key] === undefined) ?? k;
        throw new FieldManagerError(
          path,
          `element ${index}: associative list with keys has an element that omits key field ${JSON.stringify(missing)} (and doesn't have default value)`,
        );
      }
    }
    return keyPESorted(t.encodedKeys, values);
  }
  if (t.rel === 'set') {
    if (item === null) throw new FieldManagerError(path, `element ${index}: associative list without keys has an element that's an explicit null`);
    if (Array.isArray(item)) throw new FieldManagerError(path, `element ${index}: not supported: associative list with lists as elements`);
    if (isPlainObject(item)) throw new FieldManagerError(path, `element ${index}: associative list without keys has an element that's a map type`);
    return valuePE(item);
  }
  return 'i:' + String(index);
}

