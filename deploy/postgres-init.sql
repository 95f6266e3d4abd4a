-- The databases of the compose deployment: the coordinators' control
-- database and one shard per region.
CREATE DATABASE fedmesh_control;
CREATE DATABASE fedmesh_east_1;
CREATE DATABASE fedmesh_west_1;
CREATE DATABASE fedmesh_central_1;
