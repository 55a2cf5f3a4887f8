/**
 * The resources this server serves, each described once: names for discovery, the schema, the
 * printer columns of `kubectl get`, and the strategy hooks (defaults, semantic validation).
 */
import type { TSchema } from '@sinclair/typebox';
import {
  GROUP,
  PreflightValidationOCPSchema,
  PreflightValidationSchema,
  VERSION,
  type PreflightValidationStatus,
} from './schema.ts';

export type JsonObject = Record<string, unknown>;

export interface PrinterColumn {
  readonly name: string;
  readonly type: 'string' | 'integer' | 'number' | 'boolean' | 'date';
  readonly format?: string;
  readonly description: string;
  /** 0: always shown; 1: only with `-o wide`. */
  readonly priority: 0 | 1;
  /** JSONPath-like description for OpenAPI and docs, e.g. `.spec.kernelVersion`. */
  readonly jsonPath: string;
  readonly value: (obj: KubeObject) => unknown;
}

export interface KubeObject extends JsonObject {
  apiVersion?: string;
  kind?: string;
  metadata: JsonObject & {
    name?: string;
    uid?: string;
    resourceVersion?: string;
    generation?: number;
    creationTimestamp?: string;
    deletionTimestamp?: string;
    labels?: Record<string, string>;
    annotations?: Record<string, string>;
    finalizers?: string[];
    managedFields?: JsonObject[];
  };
  spec?: JsonObject;
  status?: PreflightValidationStatus;
}

export interface ResourceDefinition {
  readonly group: string;
  readonly version: string;
  readonly plural: string;
  readonly singular: string;
  readonly kind: string;
  readonly listKind: string;
  readonly shortNames: readonly string[];
  readonly categories: readonly string[];
  readonly schema: TSchema;
  readonly columns: readonly PrinterColumn[];
  /** Fills `default`s of the spec, as CRD structural defaulting does. */
  readonly applyDefaults: (obj: KubeObject) => void;
}

const spec = (o: KubeObject) => (o.spec ?? {}) as JsonObject;
const counts = (o: KubeObject) => o.status?.counts;
const condition = (o: KubeObject, type: string) => o.status?.conditions?.find((c) => c.type === type);

const countColumns = (): PrinterColumn[] => [
  {
    name: 'Verified',
    type: 'integer',
    description: 'Modules verified for the kernel.',
    priority: 0,
    jsonPath: '.status.counts.verified',
    value: (o) => counts(o)?.verified,
  },
  {
    name: 'Failed',
    type: 'integer',
    description: 'Modules whose verification failed.',
    priority: 0,
    jsonPath: '.status.counts.failed',
    value: (o) => counts(o)?.failed,
  },
  {
    name: 'Pending',
    type: 'integer',
    description: 'Modules not verified yet.',
    priority: 0,
    jsonPath: '.status.counts.pending',
    value: (o) => counts(o)?.pending,
  },
];

const ageColumn: PrinterColumn = {
  name: 'Age',
  type: 'date',
  description: 'Time since the object was created.',
  priority: 0,
  jsonPath: '.metadata.creationTimestamp',
  value: (o) => o.metadata.creationTimestamp,
};

const wideColumns = (): PrinterColumn[] => [
  {
    name: 'Errors',
    type: 'integer',
    description: 'Modules with an error while verifying (retried).',
    priority: 1,
    jsonPath: '.status.counts.error',
    value: (o) => counts(o)?.error,
  },
  {
    name: 'Total',
    type: 'integer',
    description: 'Modules in the cluster.',
    priority: 1,
    jsonPath: '.status.counts.total',
    value: (o) => counts(o)?.total,
  },
  {
    name: 'Push',
    type: 'boolean',
    description: 'Whether built or signed images are pushed.',
    priority: 1,
    jsonPath: '.spec.pushBuiltImage',
    value: (o) => spec(o)['pushBuiltImage'] ?? false,
  },
  {
    name: 'Status',
    type: 'string',
    description: 'Reason of the Verified condition.',
    priority: 1,
    jsonPath: '.status.conditions[?(@.type=="Verified")].reason',
    value: (o) => condition(o, 'Verified')?.reason,
  },
];

function defaultBool(obj: KubeObject, field: string): void {
  const s = obj.spec;
  if (s && typeof s === 'object' && s[field] === undefined) s[field] = false;
}

export const preflightValidations: ResourceDefinition = {
  group: GROUP,
  version: VERSION,
  plural: 'preflightvalidations',
  singular: 'preflightvalidation',
  kind: 'PreflightValidation',
  listKind: 'PreflightValidationList',
  shortNames: ['pfv'],
  categories: ['kmm', 'preflight'],
  schema: PreflightValidationSchema,
  columns: [
    {
      name: 'Kernel',
      type: 'string',
      description: 'Kernel version every Module is validated against.',
      priority: 0,
      jsonPath: '.spec.kernelVersion',
      value: (o) => spec(o)['kernelVersion'],
    },
    ...countColumns(),
    ageColumn,
    ...wideColumns(),
  ],
  applyDefaults: (o) => defaultBool(o, 'pushBuiltImage'),
};

export const preflightValidationsOCP: ResourceDefinition = {
  group: GROUP,
  version: VERSION,
  plural: 'preflightvalidationsocp',
  singular: 'preflightvalidationocp',
  kind: 'PreflightValidationOCP',
  listKind: 'PreflightValidationOCPList',
  shortNames: ['pfvo'],
  categories: ['kmm', 'preflight'],
  schema: PreflightValidationOCPSchema,
  columns: [
    {
      name: 'Release',
      type: 'string',
      description: 'Release image every Module is validated against.',
      priority: 0,
      jsonPath: '.spec.releaseImage',
      value: (o) => spec(o)['releaseImage'],
    },
    ...countColumns(),
    ageColumn,
    {
      name: 'Kernel',
      type: 'string',
      description: 'Kernel version resolved from the release.',
      priority: 1,
      jsonPath: '.status.kernelVersion',
      value: (o) => o.status?.kernelVersion,
    },
    {
      name: 'RT',
      type: 'boolean',
      description: 'Whether the real-time kernel is validated.',
      priority: 1,
      jsonPath: '.spec.useRTKernel',
      value: (o) => spec(o)['useRTKernel'] ?? false,
    },
    ...wideColumns(),
  ],
  applyDefaults: (o) => {
    defaultBool(o, 'pushBuiltImage');
    defaultBool(o, 'useRTKernel');
  },
};

export const RESOURCES: readonly ResourceDefinition[] = [preflightValidations, preflightValidationsOCP];
