-- brocoders/nestjs-boilerplate (NestJS + TypeORM), translated from the app's own sources at
-- commit 9620f159eefe38f47747d02ab162852367c5472c:
--   src/database/migrations/1715028537217-CreateUser.ts   (role, status, file, "user", session: verbatim)
--   src/users/.../entities/user.entity.ts, src/session/.../entities/session.entity.ts
--   .hygen/generate/relational-resource/.../entity.ejs.t and .hygen/property/add-to-relational/...
--     (the boilerplate's resource generator: a generated table has a uuid id, "createdAt",
--      "updatedAt"; a many-to-one property adds "<name>Id"). "project" and "comment" are two
--     resources generated that way, the domain tables an app built on the boilerplate has.
-- How the app writes: sign-in INSERTs a session; a token refresh UPDATEs the session's hash and
-- "updatedAt" in place (auth.service.ts refreshToken -> session.repository update); sign-out and
-- user removal are TypeORM soft deletes (UPDATE ... SET "deletedAt" = now()).
-- statusId 1 = active, 2 = inactive (src/statuses/statuses.enum.ts); roleId 1 = admin, 2 = user.
CREATE EXTENSION IF NOT EXISTS "uuid-ossp";

CREATE TABLE "role" ("id" integer NOT NULL, "name" character varying NOT NULL, CONSTRAINT "PK_b36bcfe02fc8de3c57a8b2391c2" PRIMARY KEY ("id"));
CREATE TABLE "status" ("id" integer NOT NULL, "name" character varying NOT NULL, CONSTRAINT "PK_e12743a7086ec826733f54e1d95" PRIMARY KEY ("id"));
CREATE TABLE "file" ("id" uuid NOT NULL DEFAULT uuid_generate_v4(), "path" character varying NOT NULL, CONSTRAINT "PK_36b46d232307066b3a2c9ea3a1d" PRIMARY KEY ("id"));
CREATE TABLE "user" ("id" SERIAL NOT NULL, "email" character varying, "password" character varying, "provider" character varying NOT NULL DEFAULT 'email', "socialId" character varying, "firstName" character varying, "lastName" character varying, "createdAt" TIMESTAMP NOT NULL DEFAULT now(), "updatedAt" TIMESTAMP NOT NULL DEFAULT now(), "deletedAt" TIMESTAMP, "photoId" uuid, "roleId" integer, "statusId" integer, CONSTRAINT "UQ_e12875dfb3b1d92d7d7c5377e22" UNIQUE ("email"), CONSTRAINT "REL_75e2be4ce11d447ef43be0e374" UNIQUE ("photoId"), CONSTRAINT "PK_cace4a159ff9f2512dd42373760" PRIMARY KEY ("id"));
CREATE INDEX "IDX_9bd2fe7a8e694dedc4ec2f666f" ON "user" ("socialId");
CREATE INDEX "IDX_58e4dbff0e1a32a9bdc861bb29" ON "user" ("firstName");
CREATE INDEX "IDX_f0e1b4ecdca13b177e2e3a0613" ON "user" ("lastName");
CREATE TABLE "session" ("id" SERIAL NOT NULL, "hash" character varying NOT NULL, "createdAt" TIMESTAMP NOT NULL DEFAULT now(), "updatedAt" TIMESTAMP NOT NULL DEFAULT now(), "deletedAt" TIMESTAMP, "userId" integer, CONSTRAINT "PK_f55da76ac1c3ac420f444d2ff11" PRIMARY KEY ("id"));
CREATE INDEX "IDX_3d2f174ef04fb312fdebd0ddc5" ON "session" ("userId");
ALTER TABLE "user" ADD CONSTRAINT "FK_75e2be4ce11d447ef43be0e374f" FOREIGN KEY ("photoId") REFERENCES "file"("id") ON DELETE NO ACTION ON UPDATE NO ACTION;
ALTER TABLE "user" ADD CONSTRAINT "FK_c28e52f758e7bbc53828db92194" FOREIGN KEY ("roleId") REFERENCES "role"("id") ON DELETE NO ACTION ON UPDATE NO ACTION;
ALTER TABLE "user" ADD CONSTRAINT "FK_dc18daa696860586ba4667a9d31" FOREIGN KEY ("statusId") REFERENCES "status"("id") ON DELETE NO ACTION ON UPDATE NO ACTION;
ALTER TABLE "session" ADD CONSTRAINT "FK_3d2f174ef04fb312fdebd0ddc53" FOREIGN KEY ("userId") REFERENCES "user"("id") ON DELETE NO ACTION ON UPDATE NO ACTION;

-- The seeds the boilerplate runs (src/database/seeds/relational/{role,status}).
INSERT INTO "role" ("id", "name") VALUES (1, 'Admin'), (2, 'User');
INSERT INTO "status" ("id", "name") VALUES (1, 'Active'), (2, 'Inactive');

-- Two generated resources (hygen relational-resource + add-to-relational properties).
CREATE TABLE "project" ("id" uuid NOT NULL DEFAULT uuid_generate_v4(), "name" character varying NOT NULL, "ownerId" integer, "createdAt" TIMESTAMP NOT NULL DEFAULT now(), "updatedAt" TIMESTAMP NOT NULL DEFAULT now(), CONSTRAINT "PK_project" PRIMARY KEY ("id"));
CREATE TABLE "comment" ("id" uuid NOT NULL DEFAULT uuid_generate_v4(), "body" character varying NOT NULL, "projectId" uuid, "authorId" integer, "createdAt" TIMESTAMP NOT NULL DEFAULT now(), "updatedAt" TIMESTAMP NOT NULL DEFAULT now(), CONSTRAINT "PK_comment" PRIMARY KEY ("id"));
ALTER TABLE "project" ADD CONSTRAINT "FK_project_owner" FOREIGN KEY ("ownerId") REFERENCES "user"("id") ON DELETE NO ACTION ON UPDATE NO ACTION;
ALTER TABLE "comment" ADD CONSTRAINT "FK_comment_project" FOREIGN KEY ("projectId") REFERENCES "project"("id") ON DELETE NO ACTION ON UPDATE NO ACTION;
ALTER TABLE "comment" ADD CONSTRAINT "FK_comment_author" FOREIGN KEY ("authorId") REFERENCES "user"("id") ON DELETE NO ACTION ON UPDATE NO ACTION;
