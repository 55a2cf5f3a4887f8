/**
 * The one source of truth for the v1beta2 API: these TypeBox schemas are JSON Schemas at run time
 * (request validation with ajv, the OpenAPI documents, server-side apply's structure) and give the
 * TypeScript types through `Static<>`.
 *
 * Kubernetes extensions (`x-kubernetes-list-type`, `x-kubernetes-list-map-keys`, ...) carry the
 * structure that server-side apply and kubectl need. `errorMessage` (ajv-errors) gives a sentence a
 * person can act on; it is removed from the published OpenAPI.
 */
import { Type, type Static, type TSchema } from '@sinclair/typebox';

export const GROUP = 'kmm.sigs.x-k8s.io';
export const VERSION = 'v1beta2';
export const API_VERSION = `${GROUP}/${VERSION}`;

/** A string enum, published as `enum` so that kubectl explain lists the values. */
const StringEnum = <const T extends readonly string[]>(values: T, options: { description: string }) =>
  Type.Unsafe<T[number]>({ type: 'string', enum: [...values], ...options });

const Timestamp = (description: string) => Type.String({ format: 'date-time', description });

const StringMap = (description: string) =>
  Type.Record(Type.String(), Type.String(), { description });

export const OwnerReferenceSchema = Type.Object(
  {
    apiVersion: Type.String({ description: 'API version of the referent.' }),
    kind: Type.String({ description: 'Kind of the referent.' }),
    name: Type.String({ description: 'Name of the referent.' }),
    uid: Type.String({ description: 'UID of the referent.' }),
    controller: Type.Optional(Type.Boolean({ description: 'If true, this reference points to the managing controller.' })),
    blockOwnerDeletion: Type.Optional(
      Type.Boolean({ description: 'If true, the owner cannot be deleted from storage until this reference is removed.' }),
    ),
  },
  { description: 'Information that lets you identify an owning object.', 'x-kubernetes-map-type': 'atomic' },
);

export const ManagedFieldsEntrySchema = Type.Object(
  {
    manager: Type.Optional(Type.String({ description: 'Identifier of the workflow managing these fields.' })),
    operation: Type.Optional(Type.String({ description: 'The operation that created this entry: Apply or Update.' })),
    apiVersion: Type.Optional(Type.String({ description: 'Version of the resource these fields were set in.' })),
    time: Type.Optional(Timestamp('When the entry was last changed.')),
    fieldsType: Type.Optional(Type.String({ description: 'Format of fieldsV1; only FieldsV1.' })),
    fieldsV1: Type.Optional(
      Type.Object({}, { additionalProperties: true, description: 'The set of fields this manager owns.', 'x-kubernetes-preserve-unknown-fields': true }),
    ),
    subresource: Type.Optional(Type.String({ description: 'The subresource the entry was written through.' })),
  },
  { description: 'A workflow and the set of fields it manages.' },
);

export const ObjectMetaSchema = Type.Object(
  {
    name: Type.Optional(Type.String({ description: 'Unique name of the object (a DNS subdomain).' })),
    generateName: Type.Optional(
      Type.String({ description: 'Prefix from which the server generates a unique name when name is not given.' }),
    ),
    namespace: Type.Optional(Type.String({ description: 'Always empty: these kinds are cluster-scoped.' })),
    uid: Type.Optional(Type.String({ description: 'Unique identifier set by the server.' })),
    resourceVersion: Type.Optional(Type.String({ description: 'Opaque version for optimistic concurrency and watch.' })),
    generation: Type.Optional(Type.Integer({ description: 'Sequence number of the desired state; bumped on spec changes.' })),
    creationTimestamp: Type.Optional(Type.Union([Timestamp('When the object was created.'), Type.Null()])),
    deletionTimestamp: Type.Optional(Timestamp('When deletion was requested; set by the server.')),
    deletionGracePeriodSeconds: Type.Optional(Type.Integer({ description: 'Grace period of a requested deletion.' })),
    labels: Type.Optional(StringMap('Labels for selection.')),
    annotations: Type.Optional(StringMap('Unstructured key/value data.')),
    finalizers: Type.Optional(
      Type.Array(Type.String(), {
        description: 'Must be empty before the object is deleted from storage.',
        'x-kubernetes-list-type': 'set',
      }),
    ),
    ownerReferences: Type.Optional(
      Type.Array(OwnerReferenceSchema, {
        description: 'Objects this object depends on.',
        'x-kubernetes-list-type': 'map',
        'x-kubernetes-list-map-keys': ['uid'],
      }),
    ),
    managedFields: Type.Optional(
      Type.Array(ManagedFieldsEntrySchema, { description: 'Field ownership for server-side apply.' }),
    ),
    selfLink: Type.Optional(Type.String({ description: 'Deprecated; never set.' })),
  },
  { description: 'Standard object metadata.' },
);

/** Kernel versions split on `.`, `,` or `-` into at least three non-empty fields (e.g. `6.1.0-18-amd64`). */
export const KERNEL_VERSION_PATTERN = '^[^.,\\-\\s]+([.,\\-][^.,\\-\\s]+){2,}$';

export const PreflightValidationSpecSchema = Type.Object(
  {
    kernelVersion: Type.String({
      description: 'The kernel version every Module is validated against, for example 6.1.0-18-amd64.',
      minLength: 1,
      maxLength: 256,
      pattern: KERNEL_VERSION_PATTERN,
      errorMessage: {
        pattern: 'must split on ".", "," or "-" into at least 3 non-empty fields, as a kernel release does (e.g. 6.1.0-18-amd64)',
      },
    }),
    pushBuiltImage: Type.Optional(
      Type.Boolean({
        default: false,
        description: 'Push images built or signed during validation to the Module\'s containerImage.',
      }),
    ),
  },
  { description: 'Which kernel to validate every Module against.' },
);

export const PreflightValidationOCPSpecSchema = Type.Object(
  {
    releaseImage: Type.String({
      description: 'Pull spec of the OpenShift release image whose kernel every Module is validated against.',
      minLength: 1,
      maxLength: 1024,
      format: 'image-reference',
      errorMessage: {
        format: 'must be an image reference such as quay.io/org/image:tag or registry:5000/image@sha256:<64 hex>',
      },
    }),
    pushBuiltImage: Type.Optional(
      Type.Boolean({ default: false, description: 'Push images built or signed during validation.' }),
    ),
    useRTKernel: Type.Optional(
      Type.Boolean({ default: false, description: 'Validate against the release\'s real-time kernel.' }),
    ),
  },
  { description: 'Which OpenShift release to validate every Module against.' },
);

export const VERIFICATION_STATUSES = ['True', 'False', 'Error', 'Unknown'] as const;
export const VERIFICATION_STAGES = ['Image', 'Build', 'Sign', 'Requeued', 'Done'] as const;

export const ModuleStatusSchema = Type.Object(
  {
    namespace: Type.String({ description: 'Namespace of the Module.' }),
    name: Type.String({ description: 'Name of the Module.' }),
    verificationStatus: StringEnum(VERIFICATION_STATUSES, {
        description:
          'True: verified for the kernel; False: verification failed; Error: an error prevented verification (retried); Unknown: not started.',
    }),
    verificationStage: StringEnum(VERIFICATION_STAGES, {
      description: 'The stage reached: Image, Build, Sign, Requeued (waiting to run again) or Done.',
    }),
    statusReason: Type.Optional(Type.String({ description: 'One sentence explaining the status.' })),
    lastTransitionTime: Type.Optional(
      Timestamp('When verificationStatus or verificationStage last changed.'),
    ),
  },
  { description: 'Verification result of one Module.' },
);

export const ConditionSchema = Type.Object(
  {
    type: Type.String({ description: 'Type of condition: Verified or Progressing.' }),
    status: StringEnum(['True', 'False', 'Unknown'] as const, { description: 'Status of the condition.' }),
    observedGeneration: Type.Optional(Type.Integer({ description: 'Generation the condition was set for.' })),
    lastTransitionTime: Timestamp('When the condition last changed status.'),
    reason: Type.String({ description: 'CamelCase reason for the last transition.' }),
    message: Type.String({ description: 'Human-readable details.' }),
  },
  { description: 'Standard Kubernetes condition.' },
);

export const CountsSchema = Type.Object(
  {
    total: Type.Integer({ minimum: 0, description: 'Modules in the list.' }),
    verified: Type.Integer({ minimum: 0, description: 'Modules with verificationStatus True.' }),
    failed: Type.Integer({ minimum: 0, description: 'Modules with verificationStatus False.' }),
    error: Type.Integer({ minimum: 0, description: 'Modules with verificationStatus Error (retried).' }),
    pending: Type.Integer({ minimum: 0, description: 'Modules with verificationStatus Unknown.' }),
  },
  { description: 'Module counts by verification status.' },
);

export const PreflightValidationStatusSchema = Type.Object(
  {
    kernelVersion: Type.Optional(
      Type.String({ description: 'The kernel validated (for OCP, resolved from the release image).' }),
    ),
    modules: Type.Optional(
      Type.Array(ModuleStatusSchema, {
        description: 'Per-Module verification status, keyed by namespace and name.',
        'x-kubernetes-list-type': 'map',
        'x-kubernetes-list-map-keys': ['namespace', 'name'],
      }),
    ),
    conditions: Type.Optional(
      Type.Array(ConditionSchema, {
        description: 'Verified is True when every Module is verified; Progressing while validation runs.',
        'x-kubernetes-list-type': 'map',
        'x-kubernetes-list-map-keys': ['type'],
      }),
    ),
    counts: Type.Optional(CountsSchema),
    observedGeneration: Type.Optional(Type.Integer({ description: 'The generation this status describes.' })),
  },
  { description: 'Observed state of the validation.' },
);

const objectSchema = <S extends TSchema>(kind: string, spec: S, description: string) =>
  Type.Object(
    {
      apiVersion: Type.Optional(Type.String({ description: `Always ${API_VERSION}.` })),
      kind: Type.Optional(Type.String({ description: `Always ${kind}.` })),
      metadata: Type.Optional(ObjectMetaSchema),
      spec: spec,
      status: Type.Optional(PreflightValidationStatusSchema),
    },
    { description, 'x-kubernetes-group-version-kind': [{ group: GROUP, version: VERSION, kind }] },
  );

export const PreflightValidationSchema = objectSchema(
  'PreflightValidation',
  PreflightValidationSpecSchema,
  'Validates that every KMM Module of the cluster will load on a given kernel version.',
);

export const PreflightValidationOCPSchema = objectSchema(
  'PreflightValidationOCP',
  PreflightValidationOCPSpecSchema,
  'Validates that every KMM Module of the cluster will load on the kernel of an OpenShift release.',
);

export type ObjectMeta = Static<typeof ObjectMetaSchema>;
export type ModuleStatus = Static<typeof ModuleStatusSchema>;
export type Condition = Static<typeof ConditionSchema>;
export type Counts = Static<typeof CountsSchema>;
export type PreflightValidationStatus = Static<typeof PreflightValidationStatusSchema>;
export type PreflightValidationSpec = Static<typeof PreflightValidationSpecSchema>;
export type PreflightValidationOCPSpec = Static<typeof PreflightValidationOCPSpecSchema>;
export type PreflightValidation = Static<typeof PreflightValidationSchema>;
export type PreflightValidationOCP = Static<typeof PreflightValidationOCPSchema>;
export type VerificationStatus = (typeof VERIFICATION_STATUSES)[number];
export type VerificationStage = (typeof VERIFICATION_STAGES)[number];
