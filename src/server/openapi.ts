/**
 * OpenAPI v2 and v3 documents generated from the API schemas, so that `kubectl explain`,
 * kubectl's field-validation probe and the aggregator's OpenAPI merge work as for built-in kinds.
 */
import { createHash } from 'node:crypto';
import type { ResourceDefinition } from '../api/resources.ts';
import {
  ConditionSchema,
  CountsSchema,
  ManagedFieldsEntrySchema,
  ModuleStatusSchema,
  ObjectMetaSchema,
  OwnerReferenceSchema,
  PreflightValidationStatusSchema,
} from '../api/schema.ts';
import { groupVersionsOf } from './discovery.ts';

type Schema = Record<string, unknown>;
type Dialect = 'v2' | 'v3';

const META = 'io.k8s.apimachinery.pkg.apis.meta.v1';

/** Reverse-DNS prefix of a group, as kube names CRD definitions (`io.x-k8s.sigs.kmm`). */
const groupPrefix = (group: string) => group.split('.').reverse().join('.');

function namedSchemas(resources: readonly ResourceDefinition[]) {
  const gp = (r: ResourceDefinition) => `${groupPrefix(r.group)}.${r.version}`;
  const first = resources[0]!;
  const named: [string, Schema][] = [
    [`${META}.ObjectMeta`, ObjectMetaSchema],
    [`${META}.OwnerReference`, OwnerReferenceSchema],
    [`${META}.ManagedFieldsEntry`, ManagedFieldsEntrySchema],
    [`${META}.Condition`, ConditionSchema],
    [`${gp(first)}.ModuleStatus`, ModuleStatusSchema],
    [`${gp(first)}.ModuleCounts`, CountsSchema],
    [`${gp(first)}.PreflightValidationStatus`, PreflightValidationStatusSchema],
  ];
  for (const r of resources) {
    const props = (r.schema as Schema)['properties'] as Record<string, Schema>;
    named.push([`${gp(r)}.${r.kind}Spec`, props['spec']!]);
    named.push([`${gp(r)}.${r.kind}`, r.schema as Schema]);
  }
  return named;
}

function refTo(name: string, dialect: Dialect): string {
  return dialect === 'v2' ? `#/definitions/${name}` : `#/components/schemas/${name}`;
}

function convert(schema: Schema, byJson: Map<string, string>, dialect: Dialect, top: boolean): Schema {
  const named = top ? undefined : byJson.get(JSON.stringify(schema));
  if (named) {
    // The referenced schema carries the description; repeating it makes kubectl explain print it twice.
    if (dialect === 'v2') return { $ref: refTo(named, dialect) };
    return { allOf: [{ $ref: refTo(named, dialect) }] };
  }
  const out: Schema = {};
  for (const [k, v] of Object.entries(schema)) {
    if (k === 'errorMessage') continue;
    if (k === 'anyOf' && Array.isArray(v)) {
      const nonNull = v.filter((s) => (s as Schema)['type'] !== 'null') as Schema[];
      if (nonNull.length === 1 && nonNull.length < v.length) {
        Object.assign(out, convert(nonNull[0]!, byJson, dialect, false));
        if (dialect === 'v3') out['nullable'] = true;
        continue;
      }
    }
    if (k === 'properties' && v && typeof v === 'object') {
      out[k] = Object.fromEntries(Object.entries(v).map(([p, s]) => [p, convert(s as Schema, byJson, dialect, false)]));
    } else if ((k === 'items' || k === 'additionalProperties') && v && typeof v === 'object') {
      out[k] = convert(v as Schema, byJson, dialect, false);
    } else if (k === 'patternProperties' && v && typeof v === 'object') {
      // Type.Record: a map of string to the value schema.
      out['additionalProperties'] = convert(Object.values(v)[0] as Schema, byJson, dialect, false);
    } else if (k === 'format' && v === 'image-reference') {
      continue;
    } else {
      out[k] = v;
    }
  }
  if (out['type'] === 'object' && !('properties' in out) && !('additionalProperties' in out) && dialect === 'v2') {
    out['additionalProperties'] = {};
  }
  return out;
}

function definitions(resources: readonly ResourceDefinition[], dialect: Dialect): Record<string, Schema> {
  const named = namedSchemas(resources);
  const byJson = new Map(named.map(([n, s]) => [JSON.stringify(s), n]));
  const defs: Record<string, Schema> = {};
  for (const [name, schema] of named) defs[name] = convert(schema, byJson, dialect, true);
  for (const r of resources) {
    defs[`${groupPrefix(r.group)}.${r.version}.${r.listKind}`] = {
      description: `A list of ${r.kind} objects.`,
      type: 'object',
      required: ['items'],
      properties: {
        apiVersion: { type: 'string', description: 'APIVersion of the list.' },
        kind: { type: 'string', description: 'Kind of the list.' },
        items: { type: 'array', items: { $ref: refTo(`${groupPrefix(r.group)}.${r.version}.${r.kind}`, dialect) } },
        metadata: { $ref: refTo(`${META}.ListMeta`, dialect) },
      },
      'x-kubernetes-group-version-kind': [{ group: r.group, version: r.version, kind: r.listKind }],
    };
  }
  defs[`${META}.ListMeta`] = {
    description: 'Metadata of a list.',
    type: 'object',
    properties: {
      continue: { type: 'string', description: 'Token to fetch the next page.' },
      remainingItemCount: { type: 'integer', format: 'int64', description: 'Items left after this page.' },
      resourceVersion: { type: 'string', description: 'Revision the list was read at.' },
    },
  };
  defs[`${META}.Status`] = {
    description: 'Status is a return value for calls that do not return other objects.',
    type: 'object',
    properties: {
      apiVersion: { type: 'string' },
      kind: { type: 'string' },
      code: { type: 'integer', format: 'int32' },
      message: { type: 'string' },
      reason: { type: 'string' },
      status: { type: 'string' },
      details: { type: 'object', ...(dialect === 'v2' ? { additionalProperties: {} } : {}) },
    },
    'x-kubernetes-group-version-kind': [{ group: '', version: 'v1', kind: 'Status' }],
  };
  defs[`${META}.Patch`] = { description: 'A patch document in one of the accepted formats.', type: 'object' };
  defs[`${META}.DeleteOptions`] = {
    description: 'Options for a deletion.',
    type: 'object',
    properties: {
      apiVersion: { type: 'string' },
      kind: { type: 'string' },
      dryRun: { type: 'array', items: { type: 'string' } },
      gracePeriodSeconds: { type: 'integer', format: 'int64' },
      propagationPolicy: { type: 'string' },
      preconditions: {
        type: 'object',
        properties: { resourceVersion: { type: 'string' }, uid: { type: 'string' } },
      },
    },
  };
  defs[`${META}.WatchEvent`] = {
    description: 'An event of a watch.',
    type: 'object',
    required: ['type', 'object'],
    properties: { type: { type: 'string' }, object: { type: 'object' } },
  };
  return defs;
}

interface Param {
  name: string;
  description: string;
  type: 'string' | 'boolean' | 'integer';
}

const LIST_PARAMS: Param[] = [
  { name: 'allowWatchBookmarks', type: 'boolean', description: 'Ask for BOOKMARK events in a watch.' },
  { name: 'continue', type: 'string', description: 'Continue token of a previous paginated list.' },
  { name: 'fieldSelector', type: 'string', description: 'Select by fields: metadata.name.' },
  { name: 'labelSelector', type: 'string', description: 'Select by labels.' },
  { name: 'limit', type: 'integer', description: 'Maximum number of items in a page.' },
  { name: 'resourceVersion', type: 'string', description: 'Revision to read or watch from.' },
  { name: 'resourceVersionMatch', type: 'string', description: 'Exact or NotOlderThan.' },
  { name: 'sendInitialEvents', type: 'boolean', description: 'Start a watch with the current objects.' },
  { name: 'timeoutSeconds', type: 'integer', description: 'Timeout of a list or watch.' },
  { name: 'watch', type: 'boolean', description: 'Watch for changes instead of listing.' },
];
const WRITE_PARAMS: Param[] = [
  { name: 'dryRun', type: 'string', description: 'All: run every stage but do not store.' },
  { name: 'fieldManager', type: 'string', description: 'Name of the actor making the change.' },
  { name: 'fieldValidation', type: 'string', description: 'Ignore, Warn or Strict handling of unknown fields.' },
];
const PATCH_PARAMS: Param[] = [...WRITE_PARAMS, { name: 'force', type: 'boolean', description: 'Take over conflicting fields in an apply.' }];
const DELETE_PARAMS: Param[] = [
  { name: 'dryRun', type: 'string', description: 'All: run every stage but do not store.' },
  { name: 'gracePeriodSeconds', type: 'integer', description: 'Ignored: these objects have no grace period.' },
  { name: 'propagationPolicy', type: 'string', description: 'Orphan, Background or Foreground.' },
];

const PATCH_TYPES = ['application/json-patch+json', 'application/merge-patch+json', 'application/apply-patch+yaml'];

function operation(
  dialect: Dialect,
  r: ResourceDefinition,
  action: string,
  id: string,
  params: Param[],
  body: string | undefined,
  response: string,
  consumes: string[] = ['application/json', 'application/yaml'],
) {
  const gvk = { group: r.group, version: r.version, kind: r.kind };
  const parameters = params.map((p) =>
    dialect === 'v2'
      ? { name: p.name, in: 'query', type: p.type, uniqueItems: true, description: p.description }
      : { name: p.name, in: 'query', schema: { type: p.type, uniqueItems: true }, description: p.description },
  );
  const ok = (code: string) =>
    dialect === 'v2'
      ? { [code]: { description: 'OK', schema: { $ref: refTo(response, dialect) } } }
      : { [code]: { description: 'OK', content: { 'application/json': { schema: { $ref: refTo(response, dialect) } } } } };
  const op: Record<string, unknown> = {
    operationId: id,
    description: `${action} ${r.kind}`,
    tags: [`${r.group.split('.')[0]}_${r.version}`],
    parameters,
    responses: { ...ok('200'), '401': { description: 'Unauthorized' } },
    'x-kubernetes-action': action,
    'x-kubernetes-group-version-kind': gvk,
  };
  if (body) {
    if (dialect === 'v2') {
      (op['parameters'] as unknown[]).unshift({ name: 'body', in: 'body', required: true, schema: { $ref: refTo(body, dialect) } });
      op['consumes'] = consumes;
      op['produces'] = ['application/json', 'application/yaml'];
    } else {
      op['requestBody'] = {
        required: true,
        content: Object.fromEntries(consumes.map((c) => [c, { schema: { $ref: refTo(body, dialect) } }])),
      };
    }
  }
  return op;
}

function paths(resources: readonly ResourceDefinition[], dialect: Dialect) {
  const out: Record<string, unknown> = {};
  for (const r of resources) {
    const base = `/apis/${r.group}/${r.version}/${r.plural}`;
    const prefix = `${groupPrefix(r.group)}.${r.version}`;
    const kind = `${prefix}.${r.kind}`;
    const list = `${prefix}.${r.listKind}`;
    const status = `${META}.Status`;
    const idKind = r.kind;
    const nameParam = dialect === 'v2'
      ? { name: 'name', in: 'path', required: true, type: 'string', uniqueItems: true, description: `name of the ${r.kind}` }
      : { name: 'name', in: 'path', required: true, schema: { type: 'string', uniqueItems: true }, description: `name of the ${r.kind}` };
    out[base] = {
      get: operation(dialect, r, 'list', `list${idKind}`, LIST_PARAMS, undefined, list),
      post: operation(dialect, r, 'post', `create${idKind}`, WRITE_PARAMS, kind, kind),
      delete: operation(dialect, r, 'deletecollection', `deleteCollection${idKind}`, [...DELETE_PARAMS, ...LIST_PARAMS], undefined, status),
    };
    for (const [suffix, sub] of [['', ''], ['/status', 'Status']] as const) {
      const item: Record<string, unknown> = {
        get: operation(dialect, r, 'get', `read${idKind}${sub}`, [], undefined, kind),
        put: operation(dialect, r, 'put', `replace${idKind}${sub}`, WRITE_PARAMS, kind, kind),
        patch: operation(dialect, r, 'patch', `patch${idKind}${sub}`, PATCH_PARAMS, `${META}.Patch`, kind, PATCH_TYPES),
        parameters: [nameParam],
      };
      if (suffix === '') item['delete'] = operation(dialect, r, 'delete', `delete${idKind}`, DELETE_PARAMS, undefined, kind);
      out[`${base}/{name}${suffix}`] = item;
    }
  }
  return out;
}

export interface OpenApiDocuments {
  readonly v2: string;
  /** `/openapi/v3` index. */
  readonly v3Index: string;
  /** Per group-version documents, keyed by `apis/<group>/<version>`. */
  readonly v3: ReadonlyMap<string, { readonly body: string; readonly hash: string }>;
}

/** Builds all documents once; they never change while the server runs. */
export function buildOpenApi(resources: readonly ResourceDefinition[], serverVersion: string): OpenApiDocuments {
  const info = { title: 'kmm-preflight', version: serverVersion };
  const v2 = JSON.stringify({
    swagger: '2.0',
    info,
    paths: paths(resources, 'v2'),
    definitions: definitions(resources, 'v2'),
  });
  const v3 = new Map<string, { body: string; hash: string }>();
  for (const gv of groupVersionsOf(resources)) {
    const body = JSON.stringify({
      openapi: '3.0.0',
      info,
      paths: paths(gv.resources, 'v3'),
      components: { schemas: definitions(gv.resources, 'v3') },
    });
    const hash = createHash('sha512').update(body).digest('hex').toUpperCase().slice(0, 128);
    v3.set(`apis/${gv.group}/${gv.version}`, { body, hash });
  }
  const v3Index = JSON.stringify({
    paths: Object.fromEntries(
      [...v3].map(([path, { hash }]) => [path, { serverRelativeURL: `/openapi/v3/${path}?hash=${hash}` }]),
    ),
  });
  return { v2, v3Index, v3 };
}
